//! Where the socket lives, and making its folder safe: 0700, owned by this user. On Windows the
//! "socket" is a named pipe (`\\.\pipe\cis2-agent-<user SID>` by default) and has no folder.

#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[cfg(unix)]
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// `--socket`, else `$CIS2_AGENT_SOCK`, else `[agent] socket`, else `$XDG_RUNTIME_DIR/cis2-agent/agent.sock`,
/// else `/tmp/cis2-agent-<uid>/agent.sock`.
pub fn socket_path(flag: Option<&Path>, configured: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    if let Ok(env) = std::env::var("CIS2_AGENT_SOCK")
        && !env.is_empty()
    {
        return PathBuf::from(env);
    }
    if let Some(path) = configured {
        return path.to_path_buf();
    }
    default_socket_path()
}

pub fn default_socket_path() -> PathBuf {
    cis2_ipc_client::os_default_socket_path()
}

/// When `socket` is the default moved to the user's home because another user holds the shared
/// folder: the sentence saying so, for the agent to print.
#[cfg(unix)]
pub fn fallback_note(socket: &Path) -> Option<String> {
    let default = cis2_ipc_client::resolve_os_default();
    let (folder, owner) = default.squatted.filter(|_| default.path == socket)?;
    Some(format!(
        "the shared socket folder {} belongs to {}, not to you: the agent listens at {} instead (clients find it there by the same rule)",
        folder.display(),
        cis2_ipc_client::describe_uid(owner),
        socket.display()
    ))
}

/// Windows: the pipe has no shared folder to fall back from (a squatted pipe name makes the agent
/// refuse to start instead), so there is never a note.
#[cfg(windows)]
pub fn fallback_note(_socket: &Path) -> Option<String> {
    None
}

#[cfg(unix)]
/// Creates the socket's folder 0700, or checks an existing one is ours and private (and makes it so).
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(io::Error::other(format!(
                    "{} exists and is not a folder (a symlink or file there is refused)",
                    dir.display()
                )));
            }
            if meta.uid() != current_uid() {
                return Err(io::Error::other(format!(
                    "{} belongs to another user (uid {}); refusing to put the agent's socket there",
                    dir.display(),
                    meta.uid()
                )));
            }
            if meta.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}
