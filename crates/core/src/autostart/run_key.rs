//! The Windows convention: a value named after the product under `…\CurrentVersion\Run` holding
//! the command line. The person's choice is the value under HKEY_CURRENT_USER, which needs no
//! admin; an admin's machine-wide choice is the installer's value under HKEY_LOCAL_MACHINE
//! (`/AUTOSTART`, written in the 64-bit view: scripts/windows/installer.nsi). Windows runs both,
//! and has no per-user override of a machine-wide value short of Explorer's own records, so while
//! the admin's value is there the setting shows on and cannot be changed here.

use super::{AutostartError, AutostartState};
use std::path::PathBuf;
use winreg::RegKey;
use winreg::enums::{
    HKEY_CURRENT_USER, HKEY_LOCAL_MACHINE, KEY_READ, KEY_SET_VALUE, KEY_WOW64_64KEY,
};

/// Where Windows looks, under both hives.
pub const RUN_KEY: &str = r"Software\Microsoft\Windows\CurrentVersion\Run";
/// The value's name: the installer's `PRODUCT`, so one name serves both hives.
pub const VALUE_NAME: &str = "CIS2 Agent";

/// A registry hive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hive {
    CurrentUser,
    LocalMachine,
}

impl Hive {
    fn root(self) -> RegKey {
        RegKey::predef(match self {
            Hive::CurrentUser => HKEY_CURRENT_USER,
            Hive::LocalMachine => HKEY_LOCAL_MACHINE,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Hive::CurrentUser => "HKEY_CURRENT_USER",
            Hive::LocalMachine => "HKEY_LOCAL_MACHINE",
        }
    }
}

/// The person's and the machine's `Run` keys, and the program a value starts.
#[derive(Debug, Clone)]
pub struct Autostart {
    /// Under HKEY_CURRENT_USER.
    user_key: String,
    machine: (Hive, String),
    program: PathBuf,
}

impl Autostart {
    /// The real `Run` keys, starting `program` (the running app).
    pub fn for_this_user(program: PathBuf) -> Self {
        Self::with_keys(
            RUN_KEY.into(),
            (Hive::LocalMachine, RUN_KEY.into()),
            program,
        )
    }

    /// Other keys (tests put both under HKEY_CURRENT_USER: no admin needed, no real entry touched).
    pub fn with_keys(user_key: String, machine: (Hive, String), program: PathBuf) -> Self {
        Self {
            user_key,
            machine,
            program,
        }
    }

    fn machine_wide(&self) -> bool {
        let (hive, key) = &self.machine;
        read(*hive, key).is_some()
    }

    pub fn state(&self) -> AutostartState {
        let machine_wide = self.machine_wide();
        AutostartState {
            enabled: machine_wide || read(Hive::CurrentUser, &self.user_key).is_some(),
            machine_wide,
            changeable: !machine_wide,
        }
    }

    /// Turns start at sign-in on or off for this person, and returns the state that results.
    pub fn set(&self, enabled: bool) -> Result<AutostartState, AutostartError> {
        match (enabled, self.machine_wide()) {
            (false, true) => return Err(AutostartError::MachineWide),
            // The admin's value does it: a second one of the person's own would start it twice.
            (true, true) | (false, false) => self.remove_user_value()?,
            (true, false) => self.write_user_value()?,
        }
        Ok(self.state())
    }

    /// The command line, as the installer writes it.
    fn command_line(&self) -> String {
        format!("\"{}\" --minimized", self.program.display())
    }

    fn registry_error(&self, source: std::io::Error) -> AutostartError {
        AutostartError::Registry {
            key: format!("{}\\{}", Hive::CurrentUser.name(), self.user_key),
            value: VALUE_NAME.into(),
            source,
        }
    }

    fn write_user_value(&self) -> Result<(), AutostartError> {
        let (key, _) = Hive::CurrentUser
            .root()
            .create_subkey_with_flags(&self.user_key, KEY_SET_VALUE | KEY_WOW64_64KEY)
            .map_err(|e| self.registry_error(e))?;
        key.set_value(VALUE_NAME, &self.command_line())
            .map_err(|e| self.registry_error(e))
    }

    fn remove_user_value(&self) -> Result<(), AutostartError> {
        let key = match Hive::CurrentUser
            .root()
            .open_subkey_with_flags(&self.user_key, KEY_SET_VALUE | KEY_WOW64_64KEY)
        {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.registry_error(e)),
        };
        match key.delete_value(VALUE_NAME) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.registry_error(e)),
            _ => Ok(()),
        }
    }
}

/// The value's command line, if there is a non-empty one (an emptied value starts nothing).
fn read(hive: Hive, key: &str) -> Option<String> {
    let value: String = hive
        .root()
        .open_subkey_with_flags(key, KEY_READ | KEY_WOW64_64KEY)
        .ok()?
        .get_value(VALUE_NAME)
        .ok()?;
    Some(value).filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autostart::tests::state;

    /// Keys of this test's own under HKEY_CURRENT_USER (Wine's registry, or a developer's: removed
    /// at the end), one standing in for the machine's.
    struct Keys {
        base: String,
        machine: String,
        autostart: Autostart,
    }

    impl Drop for Keys {
        fn drop(&mut self) {
            let _ = Hive::CurrentUser.root().delete_subkey_all(&self.base);
        }
    }

    fn keys(name: &str) -> Keys {
        let base = format!(r"Software\cis2-agent-tests\{name}-{}", std::process::id());
        let machine = format!(r"{base}\machine\Run");
        let autostart = Autostart::with_keys(
            format!(r"{base}\user\Run"),
            (Hive::CurrentUser, machine.clone()),
            PathBuf::from(r"C:\Program Files\CIS2 Agent\cis2-agent.exe"),
        );
        Keys {
            base,
            machine,
            autostart,
        }
    }

    fn user_value(k: &Keys) -> Option<String> {
        read(Hive::CurrentUser, &format!(r"{}\user\Run", k.base))
    }

    #[test]
    fn a_person_turns_it_on_and_off_with_their_own_run_value() {
        let k = keys("person");
        let off = state(false, false, true);
        assert_eq!(k.autostart.state(), off);
        let on = k.autostart.set(true).unwrap();
        assert_eq!(on, state(true, false, true));
        assert_eq!(
            user_value(&k).as_deref(),
            Some(r#""C:\Program Files\CIS2 Agent\cis2-agent.exe" --minimized"#)
        );
        assert_eq!(k.autostart.set(false).unwrap(), off);
        assert_eq!(user_value(&k), None, "nothing left behind");
        // Turning off what is off is not an error.
        assert_eq!(k.autostart.set(false).unwrap(), off);
    }

    #[test]
    fn the_admins_value_shows_on_and_the_person_cannot_turn_it_off() {
        let k = keys("admin");
        let (machine, _) = Hive::CurrentUser.root().create_subkey(&k.machine).unwrap();
        machine
            .set_value(
                VALUE_NAME,
                &r#""C:\Program Files\CIS2 Agent\cis2-agent.exe" --minimized"#.to_string(),
            )
            .unwrap();
        let machine_wide = state(true, true, false);
        assert_eq!(k.autostart.state(), machine_wide);
        assert!(matches!(
            k.autostart.set(false),
            Err(AutostartError::MachineWide)
        ));
        assert_eq!(k.autostart.state(), machine_wide);
        // A value of the person's own from before the admin's would start it twice: it goes.
        Hive::CurrentUser
            .root()
            .create_subkey(format!(r"{}\user\Run", k.base))
            .unwrap()
            .0
            .set_value(VALUE_NAME, &"old".to_string())
            .unwrap();
        assert_eq!(k.autostart.set(true).unwrap(), machine_wide);
        assert_eq!(user_value(&k), None);
        // An emptied machine value starts nothing, and the person decides again.
        machine.set_value(VALUE_NAME, &String::new()).unwrap();
        assert_eq!(k.autostart.state(), state(false, false, true));
    }

    #[test]
    fn the_real_keys_are_the_ones_windows_and_the_installer_use() {
        let a = Autostart::for_this_user(PathBuf::from(r"C:\a\cis2-agent.exe"));
        assert_eq!(a.user_key, RUN_KEY);
        assert_eq!(a.machine, (Hive::LocalMachine, RUN_KEY.to_string()));
        let installer = include_str!("../../../../scripts/windows/installer.nsi");
        assert!(installer.contains(&format!("!define PRODUCT \"{VALUE_NAME}\"")));
        assert!(installer.contains(&format!("!define RUN_KEY \"{RUN_KEY}\"")));
    }
}
