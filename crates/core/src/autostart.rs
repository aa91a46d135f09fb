//! Start at sign-in: whether the desktop app starts (in the tray, window hidden) when the person
//! signs in to the desktop, as the window's settings page shows and changes it. Each desktop's own
//! convention holds both the person's choice and an admin's machine-wide one:
//!
//! - Linux and other free desktops: XDG autostart entries ([`xdg`]); a person may turn off what the
//!   admin turned on.
//! - Windows: the `Run` registry keys ([`run_key`]): the person's value under HKCU, the installer's
//!   (`/AUTOSTART`) under HKLM, which the person cannot turn off.
//!
//! macOS (a LaunchAgent) is still to come, like the rest of that port.

#[cfg(windows)]
mod run_key;
#[cfg(not(windows))]
mod xdg;

#[cfg(windows)]
pub use run_key::{Autostart, RUN_KEY, VALUE_NAME};
#[cfg(not(windows))]
pub use xdg::{Autostart, ENTRY_NAME};

use std::path::PathBuf;

/// What the settings page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AutostartState {
    /// The app starts when this person signs in.
    pub enabled: bool,
    /// An admin's machine-wide choice turns it on for everyone.
    pub machine_wide: bool,
    /// The person may change it here (false where the admin's choice cannot be overridden per user).
    pub changeable: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AutostartError {
    #[error(
        "no home folder is known ($HOME and $XDG_CONFIG_HOME are unset), so there is no autostart folder"
    )]
    NoHome,
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not change the registry value {key}\\{value}: {source}")]
    Registry {
        key: String,
        value: String,
        source: std::io::Error,
    },
    #[error(
        "Your organisation starts CIS2 Agent for everyone who signs in to this computer; only an administrator can turn that off."
    )]
    MachineWide,
}

#[cfg(test)]
mod tests {
    use super::AutostartState;

    pub(super) fn state(enabled: bool, machine_wide: bool, changeable: bool) -> AutostartState {
        AutostartState {
            enabled,
            machine_wide,
            changeable,
        }
    }
}
