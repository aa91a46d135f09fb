//! The Unix socket listener (Linux, macOS): binds the socket in a 0700 folder with mode 0600, refuses
//! other users' processes by their credentials (SO_PEERCRED), identifies each peer by its process, and
//! hands the connection to [`super::server`] (which bounds connections in all and per program, and
//! re-checks the process's identity at each request).

use super::paths::{current_uid, prepare_dir};
use super::server::{Limits, ServeOptions, spawn_connection};
use crate::agent::Agent;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

/// A listening socket, bound and secured, not yet serving.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
}

impl Bound {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the socket at `path`: folder 0700, socket 0600. A live agent already there is an error; a
/// stale socket file is replaced.
pub async fn bind(path: &Path) -> io::Result<Bound> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| io::Error::other("the socket path has no folder"))?;
    prepare_dir(dir)?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent is already listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
    })
}

/// Serves `agent` on the bound socket until the task is dropped.
pub async fn serve(bound: Bound, agent: Agent, options: ServeOptions) {
    let uid = current_uid();
    let limits = Limits::new(options);
    loop {
        let Ok((stream, _)) = bound.listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Refused before it can send anything: another user's process.
        let pid = match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => cred.pid(),
            Ok(cred) => {
                tracing::warn!(
                    peer_uid = cred.uid(),
                    "refused a connection from another user"
                );
                continue;
            }
            Err(_) => continue,
        };
        // Known executables are answered from the cache at once; a new one is hashed off the
        // runtime's threads.
        spawn_connection(
            stream,
            &agent,
            &limits,
            pid,
            move |agent| agent.identify_cached(uid, pid),
            move |agent| agent.identify(uid, pid),
        );
    }
}
