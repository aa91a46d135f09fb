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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's socket when nothing says otherwise: `$CIS2_AGENT_SOCK`, else
/// `$XDG_RUNTIME_DIR/cis2-agent/agent.sock`, else `/tmp/cis2-agent-<uid>/agent.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var("CIS2_AGENT_SOCK") {
        Ok(path) if !path.is_empty() => PathBuf::from(path),
        _ => os_default_socket_path(),
    }
}

#[cfg(windows)]
mod pipe;

#[cfg(unix)]
type Reader = BufReader<UnixStream>;
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

/// The OS default alone (no environment override): `$XDG_RUNTIME_DIR/cis2-agent/agent.sock`, else
/// `/tmp/cis2-agent-<uid>/agent.sock`.
#[cfg(unix)]
pub fn os_default_socket_path() -> PathBuf {
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(dir) if !dir.is_empty() && Path::new(&dir).is_absolute() => {
            Path::new(&dir).join("cis2-agent").join("agent.sock")
        }
        _ => PathBuf::from(format!(
            "/tmp/cis2-agent-{}",
            rustix::process::getuid().as_raw()
        ))
        .join("agent.sock"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is listening at {path}: {source}")]
    NoAgent {
        path: PathBuf,
        source: std::io::Error,
    },
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

pub struct Client {
    reader: Reader,
    writer: Writer,
    next_id: u64,
    /// Events that arrived while waiting for an answer, in order.
    pending_events: std::collections::VecDeque<Value>,
}

impl Client {
    #[cfg(windows)]
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

    #[cfg(unix)]
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NoAgent {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: 1,
            pending_events: Default::default(),
        })
    }

    /// How long a read may wait (`None`: forever; `login` can take minutes).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        #[cfg(unix)]
        self.writer.set_read_timeout(timeout)?;
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
            if message.get("id").and_then(Value::as_u64) != Some(id) {
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
