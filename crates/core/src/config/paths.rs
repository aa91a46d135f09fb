//! Where the config file and the data folder are by default, from the environment and the OS.

use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Os {
    Unix,
    Mac,
    Windows,
}

impl Os {
    pub(super) const CURRENT: Os = if cfg!(windows) {
        Os::Windows
    } else if cfg!(target_os = "macos") {
        Os::Mac
    } else {
        Os::Unix
    };
}

/// Reads an environment variable; tests pass their own to the `_with` functions.
type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

pub(super) fn env_var(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

fn env_path(get: EnvLookup<'_>, name: &str) -> Option<PathBuf> {
    get(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

pub(super) fn home_dir(get: EnvLookup<'_>, os: Os) -> Option<PathBuf> {
    match os {
        Os::Windows => env_path(get, "USERPROFILE").or_else(|| env_path(get, "HOME")),
        Os::Unix | Os::Mac => env_path(get, "HOME"),
    }
}

/// The default config path (docs/configuration.md has the order and each OS's folders):
/// `$CIS2_AGENT_CONFIG`, else the user's own file, else the machine-wide one ([`system_path`]) if
/// it exists. `None` when none of the variables is set.
pub fn default_path() -> Option<PathBuf> {
    let personal = default_path_with(&env_var, Os::CURRENT);
    if env_var("CIS2_AGENT_CONFIG").is_some_and(|v| !v.is_empty())
        || personal.as_ref().is_some_and(|p| p.exists())
    {
        return personal;
    }
    match system_path(Os::CURRENT) {
        Some(system) if system.exists() => Some(system),
        _ => personal,
    }
}

/// The machine-wide config a desktop admin installs.
fn system_path(os: Os) -> Option<PathBuf> {
    match os {
        Os::Unix => Some(PathBuf::from("/etc/cis2-agent/config.toml")),
        Os::Mac => Some(PathBuf::from(
            "/Library/Application Support/cis2-agent/config.toml",
        )),
        Os::Windows => {
            env_path(&env_var, "ProgramData").map(|d| d.join("cis2-agent").join("config.toml"))
        }
    }
}

/// `explicit` (`--config FILE`) if given, else [`default_path`] (interfaces.md "Starting an agent").
pub fn resolve_path(explicit: Option<&std::path::Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_path_buf()),
        None => default_path(),
    }
}

/// The default data folder (session file, audit log, decisions; docs/configuration.md has each
/// OS's), else a per-user folder under the temp dir. The caller creates it (owner-only).
pub fn default_data_dir() -> PathBuf {
    default_data_dir_with(&env_var, Os::CURRENT)
}

fn config_dir_with(get: EnvLookup<'_>, os: Os) -> Option<PathBuf> {
    match os {
        Os::Windows => env_path(get, "APPDATA"),
        Os::Mac => home_dir(get, os).map(|h| h.join("Library").join("Application Support")),
        Os::Unix => env_path(get, "XDG_CONFIG_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| home_dir(get, os).map(|h| h.join(".config"))),
    }
}

pub(super) fn default_path_with(get: EnvLookup<'_>, os: Os) -> Option<PathBuf> {
    env_path(get, "CIS2_AGENT_CONFIG")
        .or_else(|| config_dir_with(get, os).map(|d| d.join("cis2-agent").join("config.toml")))
}

pub(super) fn default_data_dir_with(get: EnvLookup<'_>, os: Os) -> PathBuf {
    let base = match os {
        Os::Windows => env_path(get, "LOCALAPPDATA").or_else(|| env_path(get, "APPDATA")),
        Os::Mac => home_dir(get, os).map(|h| h.join("Library").join("Application Support")),
        Os::Unix => env_path(get, "XDG_DATA_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| home_dir(get, os).map(|h| h.join(".local").join("share"))),
    };
    if let Some(base) = base {
        return base.join("cis2-agent");
    }
    // Only a name that cannot climb out of the temp dir.
    let user = get("USER")
        .or_else(|| get("USERNAME"))
        .map(|u| u.to_string_lossy().into_owned())
        .filter(|u| {
            !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
        .unwrap_or_else(|| "user".to_owned());
    std::env::temp_dir().join(format!("cis2-agent-{user}"))
}
