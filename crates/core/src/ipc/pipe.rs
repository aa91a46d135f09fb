//! The named-pipe listener (Windows): `\\.\pipe\cis2-agent-<user SID>` by default. The pipe's DACL
//! grants this user and SYSTEM only; remote clients are rejected; the agent must create the first
//! instance of the name, so a program already holding it (a squatter that would receive clients'
//! requests) makes the agent refuse to start. Each client is identified by its process (id from the
//! pipe, then its executable through a held process handle, see [`identify`]) and handed to
//! [`super::server`], the same handler as the Unix socket's.

use super::server::{Limits, ServeOptions, spawn_connection};
use crate::agent::Agent;
use crate::peer::Peer;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer};

/// `ERROR_PIPE_BUSY`: the pipe exists, every instance is taken.
const ERROR_PIPE_BUSY: i32 = 231;

/// The pipe's security descriptor: protected DACL, full access to `sid` and to SYSTEM, nobody else.
pub fn security_descriptor(sid: &str) -> String {
    format!("D:P(A;;GA;;;{sid})(A;;GA;;;SY)")
}

/// A pipe created and secured, not yet serving: its first instance is held.
pub struct Bound {
    first: NamedPipeServer,
    name: PathBuf,
    sddl: String,
}

impl Bound {
    pub fn path(&self) -> &Path {
        &self.name
    }

    /// The instance waiting for the first client (tests read its security descriptor back).
    pub fn first_instance(&self) -> &NamedPipeServer {
        &self.first
    }
}

fn held_by_another(name: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "another program already holds the pipe {}; refusing to start (is another agent running? \
             if not, a program is squatting the agent's pipe name and must not receive its clients)",
            name.display()
        ),
    )
}

/// Creates the pipe `name` (`\\.\pipe\…`) as its first instance, for this user and SYSTEM only.
pub async fn bind(name: &Path) -> io::Result<Bound> {
    let text = name.as_os_str().to_string_lossy();
    if !text.starts_with(r"\\.\pipe\") || text.len() <= r"\\.\pipe\".len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                r"{text} is not a pipe name; on Windows the socket is a named pipe such as \\.\pipe\cis2-agent"
            ),
        ));
    }
    // The OS refuses a second first instance (FILE_FLAG_FIRST_PIPE_INSTANCE); asking as a client
    // first also catches a holder where that flag is not enforced (Wine) and names the problem.
    match ClientOptions::new().open(name.as_os_str()) {
        Ok(_) => return Err(held_by_another(name)),
        Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) => return Err(held_by_another(name)),
        Err(_) => {}
    }
    let sid = cis2_os::current_user_sid()?;
    let sddl = security_descriptor(&sid);
    let first = match cis2_os::create_pipe_server(name.as_os_str(), &sddl, true) {
        Ok(first) => first,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(held_by_another(name)),
        Err(e) => return Err(e),
    };
    Ok(Bound {
        first,
        name: name.to_path_buf(),
        sddl,
    })
}

/// Serves `agent` on the pipe until the task is dropped. A new instance is created as soon as a client
/// connects, so the name is never free for another program to take.
pub async fn serve(bound: Bound, agent: Agent, options: ServeOptions) {
    let Bound {
        first: mut waiting,
        name,
        sddl,
    } = bound;
    let name = name.into_os_string();
    let limits = Limits::new(options);
    loop {
        if waiting.connect().await.is_err() {
            // The client went away before we saw it; the instance is reused after disconnecting.
            let _ = waiting.disconnect();
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let accepted_at = cis2_os::now_ticks();
        let next = loop {
            match cis2_os::create_pipe_server(&name, &sddl, false) {
                Ok(next) => break next,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the next pipe instance; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let stream = std::mem::replace(&mut waiting, next);
        // The client's process, held open so its id cannot be reused while it is identified.
        let process = cis2_os::pipe_client_pid(&stream)
            .ok()
            .and_then(|pid| held_process(pid, accepted_at));
        // The per-connection limits and the per-request check are the shared handler's; on Windows
        // the held handle stands in for the process identity (see `server::still_the_same_program`).
        let pid = process
            .as_ref()
            .and_then(|process| i32::try_from(process.pid()).ok());
        spawn_connection(
            stream,
            &agent,
            &limits,
            pid,
            |_| None,
            move |agent| {
                process
                    .map(|process| identify_held(agent, &process))
                    .unwrap_or_default()
            },
        );
    }
}

/// Opens the client's process, and keeps it only if it is the process that connected: still running,
/// and started before the connection was accepted (a process that took over a reused id after the
/// client ended started later).
fn held_process(pid: u32, accepted_at: u64) -> Option<cis2_os::Process> {
    let process = cis2_os::Process::open(pid).ok()?;
    let started = process.creation_time().ok()?;
    if started > accepted_at || !process.is_running().ok()? {
        tracing::warn!(
            pid,
            "the pipe client's process ended before it was identified"
        );
        return None;
    }
    Some(process)
}

/// Identifies the held process; the handle pins its id for as long as this runs.
pub fn identify_held(agent: &Agent, process: &cis2_os::Process) -> Peer {
    let pid = i32::try_from(process.pid()).ok();
    agent
        .identify_cached(0, pid)
        .unwrap_or_else(|| agent.identify(0, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_names_the_user_and_system_only() {
        assert_eq!(
            security_descriptor("S-1-5-21-1-2-3-1000"),
            "D:P(A;;GA;;;S-1-5-21-1-2-3-1000)(A;;GA;;;SY)"
        );
    }

    #[tokio::test]
    async fn a_name_that_is_not_a_pipe_is_refused_clearly() {
        let e = bind(Path::new(r"C:\tmp\agent.sock")).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("named pipe"), "{e}");
    }

    #[tokio::test]
    async fn a_held_name_is_refused_and_the_descriptor_reads_back() {
        let name = PathBuf::from(format!(r"\\.\pipe\cis2-core-test-{}", std::process::id()));
        let bound = bind(&name).await.unwrap();
        let sid = cis2_os::current_user_sid().unwrap();
        let sddl = cis2_os::security_sddl(bound.first_instance()).unwrap();
        assert!(sddl.contains(&format!(";;;{sid})")), "{sddl}");
        assert!(sddl.contains(";;;SY)"), "{sddl}");
        assert!(
            !sddl.contains(";;;WD)") && !sddl.contains(";;;AU)"),
            "{sddl}"
        );
        let e = bind(&name).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("refusing to start"), "{e}");
    }

    /// A client coming over the network (SMB, here the loopback `\\127.0.0.1\pipe\…`) is refused by
    /// `PIPE_REJECT_REMOTE_CLIENTS`. Wine has no SMB server behind pipe paths, so this needs real Windows
    /// (with the Server service running, as it is by default).
    #[tokio::test]
    async fn real_windows_a_remote_client_is_refused() {
        if cis2_os::under_wine() {
            eprintln!(
                "skipped under Wine: Wine serves no pipe over SMB, so remote clients need real Windows"
            );
            return;
        }
        let local = format!(r"\\.\pipe\cis2-core-remote-{}", std::process::id());
        let _bound = bind(Path::new(&local)).await.unwrap();
        let remote = local.replacen(r"\\.\", r"\\127.0.0.1\", 1);
        let e = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&remote)
            .expect_err("a remote client must not open the agent's pipe");
        assert_eq!(
            e.raw_os_error(),
            Some(5),
            "refused as access denied, not for another reason (is the Server service running?): {e}"
        );
    }
}
