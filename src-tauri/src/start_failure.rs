//! Telling the person at the desk that the app could not start. Started from a menu, at sign-in or
//! from Explorer, the app's error line goes nowhere (a Windows GUI program has no console at all), and
//! a clinician would see nothing happen; so the failure — a config mistake with its file, line and
//! fix, a socket another agent holds, or an option mistyped in a shortcut — is also shown in a
//! dialog, and the app exits once it is closed. From a terminal the line is enough and no dialog is
//! shown.

use std::io::IsTerminal;

/// The dialog's title.
pub const TITLE: &str = "CIS2 Agent could not start";

/// Shows `failure` in a dialog unless standard error is a terminal (which has shown it already).
/// Returns when the dialog is closed, or at once when none can be shown.
pub fn show(failure: &str) {
    if std::io::stderr().is_terminal() {
        return;
    }
    // An option's error ends with how to ask for help on a command line: not for a dialog.
    let failure = failure.split("\nUsage:").next().unwrap_or(failure).trim();
    let text =
        format!("{failure}\n\nIf you cannot fix this, tell your IT service desk what it says.");
    show_dialog(&text);
}

#[cfg(target_os = "linux")]
fn show_dialog(text: &str) {
    use gtk::prelude::*;
    // Tauri has started GTK on this thread when the app's setup fails; an option's error comes
    // before Tauri, and without a display there is no dialog to show.
    if gtk::init().is_err() {
        return;
    }
    let dialog = gtk::MessageDialog::new(
        None::<&gtk::Window>,
        gtk::DialogFlags::MODAL,
        gtk::MessageType::Error,
        gtk::ButtonsType::Ok,
        TITLE,
    );
    dialog.set_title(TITLE);
    dialog.set_secondary_text(Some(text));
    dialog.set_keep_above(true);
    dialog.set_position(gtk::WindowPosition::Center);
    dialog.run();
    dialog.close();
}

#[cfg(windows)]
fn show_dialog(text: &str) {
    if let Err(e) = cis2_os::show_error_box(TITLE, text) {
        tracing::warn!(error = %e, "the message box could not be shown");
    }
}

#[cfg(not(any(target_os = "linux", windows)))]
fn show_dialog(_text: &str) {}
