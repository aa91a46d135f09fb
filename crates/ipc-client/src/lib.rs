//! The client side of the cis2-agent socket, for desktop programs written in Rust (and for `cis2ctl`
//! and the tests): connect, call a method, read events. Blocking and dependency-light on purpose, so an
//! EHR's helper process can link it without an async runtime. The protocol itself is in docs/ipc.md.
//! On Windows the agent is a named pipe (`pipe.rs`): the client checks the pipe's server runs as this
//! user, and keeps a small tokio runtime of its own for read timeouts.
//!
//! ```no_run
//! let mut agent = cis2_ipc_client::Client::connect(&cis2_ipc_client::default_socket_path())?;
//! let token = agent.call("token", serde_json::json!({"min_valid_secs": 60}))?;
//! // Hand it to your HTTP client; never log it.
//! let authorization = format!("Bearer {}", token["access_token"].as_str().unwrap_or_default());
//! # let _ = authorization;
//! # Ok::<(), cis2_ipc_client::ClientError>(())
//! ```

use serde_json::{Value, json};
use std::io::Write;
#[cfg(unix)]
use std::io::{BufRead, BufReader};
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's socket when nothing says otherwise: `$CIS2_AGENT_SOCK`, else [`os_default_socket_path`].
pub fn default_socket_path() -> PathBuf {
    match std::env::var("CIS2_AGENT_SOCK") {
        Ok(path) if !path.is_empty() => PathBuf::from(path),
        _ => os_default_socket_path(),
    }
}

#[cfg(windows)]
mod pipe;

#[cfg(unix)]
type Reader = BufReader<AnswerReader>;
#[cfg(unix)]
type Writer = UnixStream;
#[cfg(windows)]
type Reader = pipe::Reader;
#[cfg(windows)]
type Writer = pipe::Writer;

/// The OS default on Windows: the named pipe `\\.\pipe\cis2-agent-<SID of this user>`.
#[cfg(windows)]
pub fn os_default_socket_path() -> PathBuf {
    pipe::default_pipe_name()
}

/// On Windows the default is the user's named pipe: the agent creates its first instance (or refuses
/// to start) and clients check its server's user, so there is no shared folder to fall back from.
#[cfg(windows)]
pub fn resolve_os_default() -> DefaultSocket {
    DefaultSocket {
        path: pipe::default_pipe_name(),
        squatted: None,
    }
}

/// The OS default alone (no environment override); see [`resolve_os_default`] for the rule.
#[cfg(unix)]
pub fn os_default_socket_path() -> PathBuf {
    resolve_os_default().path
}

/// Where the OS default put the socket, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultSocket {
    pub path: PathBuf,
    /// Set when the shared folder (`/tmp/cis2-agent-<uid>`) is held by someone else and the socket
    /// went to the user's home instead: that folder and its owner's uid.
    pub squatted: Option<(PathBuf, u32)>,
}

/// The one rule the agent and every client follow (docs/ipc.md, "Where the socket is"):
/// `$XDG_RUNTIME_DIR/cis2-agent/agent.sock` when `$XDG_RUNTIME_DIR` is set (a folder only this user
/// can write to); else `/tmp/cis2-agent-<uid>/agent.sock` — unless that folder already exists and is
/// not this user's own folder (another user can create it first in the shared /tmp), in which case
/// `$HOME/.cache/cis2-agent/agent.sock`. The agent and its clients look at the same folder, so they
/// agree; the agent says when it fell back.
#[cfg(unix)]
pub fn resolve_os_default() -> DefaultSocket {
    if let Ok(dir) = std::env::var("XDG_RUNTIME_DIR")
        && !dir.is_empty()
        && Path::new(&dir).is_absolute()
    {
        return DefaultSocket {
            path: Path::new(&dir).join("cis2-agent").join("agent.sock"),
            squatted: None,
        };
    }
    let uid = rustix::process::getuid().as_raw();
    let shared = PathBuf::from(format!("/tmp/cis2-agent-{uid}"));
    let holder = std::fs::symlink_metadata(&shared)
        .ok()
        .filter(|meta| !meta.is_dir() || meta.uid() != uid)
        .map(|meta| meta.uid());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|home| home.is_absolute());
    match (holder, home) {
        (Some(owner), Some(home)) => DefaultSocket {
            path: home.join(".cache").join("cis2-agent").join("agent.sock"),
            squatted: Some((shared, owner)),
        },
        _ => DefaultSocket {
            path: shared.join("agent.sock"),
            squatted: None,
        },
    }
}

/// A uid with its user name when the system's user list has it (`1001 (mallory)`).
#[cfg(unix)]
pub fn describe_uid(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|users| {
            users.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)? == uid.to_string()).then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// Checks that `path`'s folder is this user's own and closed to others (0700): anything else could be
/// another user's fake agent, waiting for this user's requests.
#[cfg(unix)]
pub fn check_socket_folder(path: &Path) -> Result<(), ClientError> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let uid = rustix::process::geteuid().as_raw();
    let meta = std::fs::symlink_metadata(&folder).map_err(|source| ClientError::NoAgent {
        path: path.to_path_buf(),
        source,
    })?;
    let why = if !meta.is_dir() {
        Some(format!(
            "is not a folder (a symlink or a file, owned by {})",
            describe_uid(meta.uid())
        ))
    } else if meta.uid() != uid {
        Some(format!(
            "belongs to {}, not to you ({})",
            describe_uid(meta.uid()),
            describe_uid(uid)
        ))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "is open to other users (mode {:o}; it must be 700)",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(ClientError::UnsafeFolder { folder, why }),
        None => Ok(()),
    }
}

/// The uid of the process listening on the other end (`SO_PEERCRED`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn server_uid(stream: &UnixStream) -> std::io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(stream)?.uid.as_raw())
}

/// Elsewhere this crate does not yet ask the OS who the server is, so it connects to nothing rather
/// than trust an unchecked server (macOS's `getpeereid` is to come; Windows checks the pipe's server in `pipe.rs`).
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn server_uid(_stream: &UnixStream) -> std::io::Result<u32> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "this client cannot yet check who the agent on this OS is",
    ))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no agent is listening at {path}: {source}")]
    NoAgent {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The socket's folder is not this user's own private folder: nothing was sent.
    #[error(
        "the agent's socket folder {folder} {why}: it may be another user's fake agent, so nothing was sent. Remove the folder if it is yours; else ask an administrator to remove it (the agent then uses it again), or set CIS2_AGENT_SOCK"
    )]
    UnsafeFolder { folder: PathBuf, why: String },
    /// The process listening at the socket is another user's: nothing was sent.
    #[error(
        "the program listening at {path} runs as {owner}, not as you: it is not your agent, so nothing was sent"
    )]
    NotYourAgent { path: PathBuf, owner: String },
    /// Windows: the pipe's server runs as another user (a squatter), so nothing was sent to it.
    #[cfg(windows)]
    #[error("refusing the pipe {path}: {source}")]
    NotOurAgent {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the connection to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    /// The agent answered with a JSON-RPC error.
    #[error("{message}")]
    Rpc { code: i64, message: String },
    #[error("the agent's answer was not understood: {0}")]
    Protocol(String),
}

/// Ends a [`Client`]'s connection from another thread (see [`Client::shutdown_handle`]).
pub struct Shutdown {
    #[cfg(unix)]
    stream: UnixStream,
    #[cfg(windows)]
    closed: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Shutdown {
    /// Ends the connection in both directions; idempotent.
    pub fn shutdown(&self) {
        #[cfg(unix)]
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        #[cfg(windows)]
        self.closed.send_replace(true);
    }
}

/// The socket's reading side. It waits for the agent's answer in `poll(POLLIN)`, not in a blocking
/// `read`: Linux wakes a thread blocked in `read` on a Unix socket whenever the socket may be written
/// again too — that is, as soon as the agent has read the request — so each call would wake the
/// caller once for nothing. `poll` is woken only for what it asked for, and carries the read timeout.
#[cfg(unix)]
struct AnswerReader {
    stream: UnixStream,
    timeout: Option<Duration>,
}

#[cfg(unix)]
impl std::io::Read for AnswerReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let timeout = self.timeout.map(|t| Timespec {
            tv_sec: t.as_secs() as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        let mut ready = [PollFd::new(&self.stream, PollFlags::IN)];
        if rustix::event::poll(&mut ready, timeout.as_ref())? == 0 {
            // What a read timeout (SO_RCVTIMEO) gives: EAGAIN.
            return Err(rustix::io::Errno::AGAIN.into());
        }
        std::io::Read::read(&mut self.stream, buf)
    }
}

pub struct Client {
    reader: Reader,
    writer: Writer,
    next_id: u64,
    /// Events that arrived while waiting for an answer, in order.
    pending_events: std::collections::VecDeque<Value>,
}

impl Client {
    #[cfg(windows)]
    /// Connects to the named pipe after checking, before anything is sent, that its server process
    /// runs as this user.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let (reader, writer) = pipe::connect(path).map_err(|(source, not_ours)| {
            let path = path.to_path_buf();
            if not_ours {
                ClientError::NotOurAgent { path, source }
            } else {
                ClientError::NoAgent { path, source }
            }
        })?;
        Ok(Client {
            reader,
            writer,
            next_id: 1,
            pending_events: Default::default(),
        })
    }

    /// Connects after checking, before anything is sent, that the socket's folder is this user's own
    /// (0700) and that the process listening is this user's.
    #[cfg(unix)]
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        check_socket_folder(path)?;
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NoAgent {
            path: path.to_path_buf(),
            source,
        })?;
        let owner = server_uid(&stream)?;
        if owner != rustix::process::geteuid().as_raw() {
            return Err(ClientError::NotYourAgent {
                path: path.to_path_buf(),
                owner: describe_uid(owner),
            });
        }
        Ok(Client {
            reader: BufReader::new(AnswerReader {
                stream: stream.try_clone()?,
                timeout: None,
            }),
            writer: stream,
            next_id: 1,
            pending_events: Default::default(),
        })
    }

    /// A handle that ends this connection from another thread: a read blocked on it (a thread waiting
    /// in [`Client::next_event`]) returns an error at once, so a library can stop its event thread.
    pub fn shutdown_handle(&self) -> Result<Shutdown, ClientError> {
        #[cfg(unix)]
        return Ok(Shutdown {
            stream: self.writer.try_clone()?,
        });
        #[cfg(windows)]
        return Ok(Shutdown {
            closed: self.reader.closer(),
        });
    }

    /// How long a read may wait (`None`: forever; `login` can take minutes).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        #[cfg(unix)]
        {
            self.reader.get_mut().timeout = timeout;
        }
        #[cfg(windows)]
        self.reader.set_timeout(timeout);
        Ok(())
    }

    /// Sends one raw line (tests use it for malformed input) and returns the next line received.
    pub fn raw(&mut self, line: &[u8]) -> Result<Value, ClientError> {
        self.writer.write_all(line)?;
        self.writer.write_all(b"\n")?;
        self.read_message()
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol(
                "the agent closed the connection".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Calls `method` and waits for its answer; events that arrive meanwhile are kept for [`Client::next_event`].
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let message = self.read_message()?;
            if message.get("method").and_then(Value::as_str) == Some("event") {
                self.pending_events.push_back(message["params"].clone());
                continue;
            }
            // An error with a null id is the agent refusing the connection itself (too many
            // connections, the program changed): the reason this call cannot be answered, not a
            // stranger's answer to skip until the connection closes.
            let refused = message.get("id") == Some(&Value::Null) && message.get("error").is_some();
            if message.get("id").and_then(Value::as_u64) != Some(id) && !refused {
                continue;
            }
            if let Some(error) = message.get("error") {
                return Err(ClientError::Rpc {
                    code: error["code"].as_i64().unwrap_or(0),
                    message: error["message"].as_str().unwrap_or_default().to_string(),
                });
            }
            return message.get("result").cloned().ok_or_else(|| {
                ClientError::Protocol("an answer with neither result nor error".into())
            });
        }
    }

    /// The next event (`params` of an `event` notification), after `subscribe`.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(event) = self.pending_events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("method").and_then(Value::as_str) == Some("event") {
                return Ok(message["params"].clone());
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    /// A stand-in agent on a socket in a private folder: `serve` gets each accepted connection.
    fn agent(serve: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve(listener.accept().unwrap().0));
        (dir, path)
    }

    fn read_request(stream: &UnixStream) -> Value {
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn an_answer_that_comes_in_pieces_with_an_event_before_it_is_read_whole() {
        let (_dir, path) = agent(|mut stream| {
            let request = read_request(&stream);
            let answer = format!(
                "{}\n",
                json!({"jsonrpc": "2.0", "id": request["id"], "result": {"access_token": "t"}})
            );
            let (first, rest) = answer.split_at(answer.len() / 2);
            stream
                .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"params\":{\"type\":\"locked\"}}\n")
                .unwrap();
            stream.write_all(first.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            stream.write_all(rest.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let mut client = Client::connect(&path).unwrap();
        client.set_timeout(Some(Duration::from_secs(10))).unwrap();
        let answer = client.call("token", json!({})).unwrap();
        assert_eq!(answer["access_token"], "t");
        assert_eq!(client.next_event().unwrap()["type"], "locked");
    }

    #[test]
    fn a_read_timeout_ends_the_wait_for_an_answer_that_does_not_come() {
        let (_dir, path) = agent(|stream| {
            read_request(&stream);
            std::thread::sleep(Duration::from_secs(5));
        });
        let mut client = Client::connect(&path).unwrap();
        client
            .set_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = std::time::Instant::now();
        match client.call("token", json!({})) {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn a_shutdown_from_another_thread_ends_a_wait_for_events() {
        let (_dir, path) = agent(|stream| {
            std::thread::sleep(Duration::from_secs(5));
            drop(stream);
        });
        let mut client = Client::connect(&path).unwrap();
        let shutdown = client.shutdown_handle().unwrap();
        let waiting = std::thread::spawn(move || client.next_event());
        std::thread::sleep(Duration::from_millis(50));
        let started = std::time::Instant::now();
        shutdown.shutdown();
        assert!(waiting.join().unwrap().is_err());
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
