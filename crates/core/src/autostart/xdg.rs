//! The XDG convention (Linux and other free desktops; freedesktop.org Desktop Application Autostart
//! Specification). An admin's machine-wide choice is an entry in a system folder
//! (`/etc/xdg/autostart/cis2-agent.desktop`); a person's own choice is an entry of the same name in
//! `~/.config/autostart/`, which takes precedence over it. So a person may turn off what the admin
//! turned on (the override says `Hidden=true`), and turning it back on removes the override, so the
//! admin's entry applies again rather than a copy of it.

use super::{AutostartError, AutostartState};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The entry's file name, in the user's and the system's autostart folders alike.
pub const ENTRY_NAME: &str = "cis2-agent.desktop";

/// The autostart folders of one person, and the command an entry starts.
#[derive(Debug, Clone)]
pub struct Autostart {
    /// None without a home folder: nothing starts, and turning it on says why it cannot.
    user_dir: Option<PathBuf>,
    system_dirs: Vec<PathBuf>,
    program: PathBuf,
}

impl Autostart {
    /// The folders the XDG spec names for this process's user (`$XDG_CONFIG_HOME` or `~/.config`;
    /// `$XDG_CONFIG_DIRS` or `/etc/xdg`), starting `program` (the running app).
    pub fn for_this_user(program: PathBuf) -> Self {
        Self::from_env(&|name| std::env::var_os(name), program)
    }

    fn from_env(get: &dyn Fn(&str) -> Option<OsString>, program: PathBuf) -> Self {
        let absolute = |name: &str| get(name).map(PathBuf::from).filter(|p| p.is_absolute());
        let config_home = absolute("XDG_CONFIG_HOME")
            .or_else(|| absolute("HOME").map(|home| home.join(".config")));
        let config_dirs: Vec<PathBuf> = get("XDG_CONFIG_DIRS")
            .filter(|v| !v.is_empty())
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| p.is_absolute())
                    .collect()
            })
            .unwrap_or_else(|| vec![PathBuf::from("/etc/xdg")]);
        Self {
            user_dir: config_home.map(|d| d.join("autostart")),
            system_dirs: config_dirs.iter().map(|d| d.join("autostart")).collect(),
            program,
        }
    }

    /// Explicit folders (tests; other desktops' conventions).
    pub fn with_dirs(user_dir: PathBuf, system_dirs: Vec<PathBuf>, program: PathBuf) -> Self {
        Self {
            user_dir: Some(user_dir),
            system_dirs,
            program,
        }
    }

    fn user_entry(&self) -> Option<PathBuf> {
        self.user_dir.as_ref().map(|d| d.join(ENTRY_NAME))
    }

    /// The admin's entry wins over later system folders, as the spec orders them.
    fn system_entry(&self) -> Option<PathBuf> {
        self.system_dirs
            .iter()
            .map(|d| d.join(ENTRY_NAME))
            .find(|p| p.is_file())
    }

    pub fn state(&self) -> AutostartState {
        let machine_wide = self.system_entry().is_some_and(|p| starts(&p));
        let enabled = match self.user_entry() {
            Some(user) if user.is_file() => starts(&user),
            _ => machine_wide,
        };
        AutostartState {
            enabled,
            machine_wide,
            changeable: true,
        }
    }

    /// Turns start at sign-in on or off for this person, and returns the state that results.
    pub fn set(&self, enabled: bool) -> Result<AutostartState, AutostartError> {
        let machine_wide = self.system_entry().is_some_and(|p| starts(&p));
        match (enabled, machine_wide) {
            // The admin's entry does it: no copy of our own that would outlive their changes.
            (true, true) | (false, false) => self.remove_user_entry()?,
            (true, false) => self.write_user_entry(&self.entry_text())?,
            (false, true) => self.write_user_entry(HIDDEN_ENTRY)?,
        }
        Ok(self.state())
    }

    fn entry_text(&self) -> String {
        format!(
            "[Desktop Entry]\nType=Application\nName=CIS2 Agent\n\
             Comment=Care Identity (NHS CIS2) sign-in for clinical software\n\
             Exec={} --minimized\nIcon=cis2-agent\nTerminal=false\nX-GNOME-Autostart-enabled=true\n",
            exec_argument(&self.program)
        )
    }

    fn write_user_entry(&self, text: &str) -> Result<(), AutostartError> {
        let (Some(dir), Some(path)) = (&self.user_dir, self.user_entry()) else {
            return Err(AutostartError::NoHome);
        };
        let write_error = |source| AutostartError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(write_error)?;
        // Written beside it and renamed over it: a desktop session reading the folder never sees
        // half an entry.
        let partial = dir.join(format!(".{ENTRY_NAME}.partial"));
        std::fs::write(&partial, text).map_err(write_error)?;
        std::fs::rename(&partial, &path).map_err(write_error)
    }

    fn remove_user_entry(&self) -> Result<(), AutostartError> {
        let Some(path) = self.user_entry() else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(AutostartError::Remove { path, source: e })
            }
            _ => Ok(()),
        }
    }
}

/// The override that turns an admin's entry off for one person.
const HIDDEN_ENTRY: &str = "[Desktop Entry]\nType=Application\nName=CIS2 Agent\nHidden=true\n";

/// Whether an entry starts anything: not `Hidden=true`, not GNOME's `X-GNOME-Autostart-enabled=false`.
fn starts(entry: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(entry) else {
        return false;
    };
    !text.lines().any(|line| {
        let Some((key, value)) = line.split_once('=') else {
            return false;
        };
        let (key, value) = (key.trim(), value.trim());
        (key == "Hidden" && value == "true")
            || (key == "X-GNOME-Autostart-enabled" && value == "false")
    })
}

/// The program as one argument of an `Exec` line: quoted, with the characters the Desktop Entry
/// spec reserves inside quotes escaped, and `%` doubled (it would start a field code).
fn exec_argument(program: &Path) -> String {
    let mut quoted = String::from("\"");
    for c in program.to_string_lossy().chars() {
        match c {
            '"' | '`' | '$' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '%' => quoted.push_str("%%"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autostart::tests::state;

    struct Folders {
        _dir: tempfile::TempDir,
        user: PathBuf,
        admin: PathBuf,
        autostart: Autostart,
    }

    fn folders() -> Folders {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("home/.config/autostart");
        let admin = dir.path().join("etc/xdg/autostart");
        let autostart = Autostart::with_dirs(
            user.clone(),
            vec![admin.clone()],
            PathBuf::from("/opt/CIS2 Agent/cis2-agent"),
        );
        Folders {
            _dir: dir,
            user,
            admin,
            autostart,
        }
    }

    fn install_admin_entry(f: &Folders, text: &str) {
        std::fs::create_dir_all(&f.admin).unwrap();
        std::fs::write(f.admin.join(ENTRY_NAME), text).unwrap();
    }

    #[test]
    fn a_person_turns_it_on_and_off_with_their_own_entry() {
        let f = folders();
        let off = state(false, false, true);
        assert_eq!(f.autostart.state(), off);
        let on = f.autostart.set(true).unwrap();
        assert_eq!(on, state(true, false, true));
        let entry = std::fs::read_to_string(f.user.join(ENTRY_NAME)).unwrap();
        assert!(
            entry.contains("Exec=\"/opt/CIS2 Agent/cis2-agent\" --minimized\n"),
            "{entry}"
        );
        assert!(entry.starts_with("[Desktop Entry]\n"));
        assert_eq!(f.autostart.set(false).unwrap(), off);
        assert!(!f.user.join(ENTRY_NAME).exists(), "nothing left behind");
        // Turning off what is off is not an error.
        assert_eq!(f.autostart.set(false).unwrap(), off);
    }

    #[test]
    fn the_admins_entry_turns_it_on_and_a_person_may_turn_it_off_and_back() {
        let f = folders();
        install_admin_entry(
            &f,
            "[Desktop Entry]\nType=Application\nExec=cis2-agent --minimized\n",
        );
        let machine_wide = state(true, true, true);
        assert_eq!(f.autostart.state(), machine_wide);
        let off = f.autostart.set(false).unwrap();
        assert_eq!(off, state(false, true, true));
        let entry = std::fs::read_to_string(f.user.join(ENTRY_NAME)).unwrap();
        assert!(entry.contains("Hidden=true"), "{entry}");
        // Back on: the override goes, and the admin's own entry applies again.
        assert_eq!(f.autostart.set(true).unwrap(), machine_wide);
        assert!(!f.user.join(ENTRY_NAME).exists());
    }

    #[test]
    fn an_admin_entry_that_is_switched_off_does_not_count() {
        let f = folders();
        install_admin_entry(&f, "[Desktop Entry]\nX-GNOME-Autostart-enabled=false\n");
        assert_eq!(f.autostart.state(), state(false, false, true));
        assert!(f.autostart.set(true).unwrap().enabled);
        assert!(f.user.join(ENTRY_NAME).exists());
    }

    #[test]
    fn folders_come_from_the_xdg_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let a = Autostart::from_env(&env(&[("HOME", "/home/a")]), "x".into());
        assert_eq!(
            a.user_dir.as_deref(),
            Some(Path::new("/home/a/.config/autostart"))
        );
        assert_eq!(a.system_dirs, vec![PathBuf::from("/etc/xdg/autostart")]);
        let b = Autostart::from_env(
            &env(&[
                ("HOME", "/home/a"),
                ("XDG_CONFIG_HOME", "/cfg"),
                ("XDG_CONFIG_DIRS", "/site:relative:/etc/xdg"),
            ]),
            "x".into(),
        );
        assert_eq!(b.user_dir.as_deref(), Some(Path::new("/cfg/autostart")));
        assert_eq!(
            b.system_dirs,
            vec![
                PathBuf::from("/site/autostart"),
                PathBuf::from("/etc/xdg/autostart")
            ]
        );
        let homeless = Autostart::from_env(&env(&[]), "x".into());
        assert!(!homeless.state().enabled);
        assert!(matches!(homeless.set(true), Err(AutostartError::NoHome)));
        assert!(!homeless.set(false).unwrap().enabled);
    }

    #[test]
    fn an_odd_program_path_stays_one_argument() {
        assert_eq!(
            exec_argument(Path::new("/opt/a \"b\"/$x/100%/c")),
            r#""/opt/a \"b\"/\$x/100%%/c""#
        );
    }
}
