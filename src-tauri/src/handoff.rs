//! A second launch hands over to the running app as its first act. tauri-plugin-single-instance
//! does the same, but only once Tauri is built: after this process has started itself again without
//! OpenGL, opened the display and initialised GTK, which is most of a second launch's time. Here the
//! plugin's own D-Bus call is made before any of that — by the `cis2-agent` launcher, which links
//! no GTK or WebKit, and again by the app first thing in `main` when it is started directly; if no
//! app answers, the launch goes on and the plugin takes the name (and still settles two launches
//! racing each other). Shared by path between the library and the launcher.

/// The name and object the plugin serves: Tauri's identifier (tauri.conf.json) + `.SingleInstance`.
#[cfg(target_os = "linux")]
const BUS_NAME: &str = "org.cis2agent.desktop.SingleInstance";
#[cfg(target_os = "linux")]
const OBJECT_PATH: &str = "/org/cis2agent/desktop/SingleInstance";

/// Asks the running app, if there is one, to open its window; true if it did (this launch is done).
#[cfg(target_os = "linux")]
pub fn to_running_app() -> bool {
    let Ok(bus) = zbus::blocking::Connection::session() else {
        return false;
    };
    let argv: Vec<String> = std::env::args_os()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let cwd = std::env::current_dir()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // With no app running the bus answers at once that nobody owns the name.
    bus.call_method(
        Some(BUS_NAME),
        OBJECT_PATH,
        Some("org.SingleInstance.DBus"),
        "ExecuteCallback",
        &(argv, cwd),
    )
    .is_ok()
}

/// Elsewhere the plugin alone does it (on Windows a named mutex and a window message, which are
/// quick without this).
#[cfg(not(target_os = "linux"))]
pub fn to_running_app() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The plugin derives its name from the identifier; if that changes, so must these.
    #[test]
    fn the_name_is_the_one_the_plugin_serves() {
        let config: serde_json::Value =
            serde_json::from_str(include_str!("../../tauri.conf.json")).unwrap();
        let identifier = config["identifier"].as_str().unwrap();
        assert_eq!(BUS_NAME, format!("{identifier}.SingleInstance"));
        assert_eq!(
            OBJECT_PATH,
            format!("/{}", BUS_NAME.replace('.', "/").replace('-', "_"))
        );
    }
}
