//! The library's logic in safe Rust: a handle with a small pool of connections (so that one handle may
//! be used from several threads at once, and a sign-in waiting in one thread does not hold up another),
//! the calls, the mapping of the agent's errors to the stable return codes, and the event thread.

use crate::codes::*;
use cis2_ipc_client::{Client as Connection, ClientError, Shutdown};
use serde_json::{Value, json};
use std::ffi::{CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The agent abandons a request after 60 s (docs/ipc.md, Limits); a little more, so that its own
/// answer, which says why, arrives before ours.
const CALL_TIMEOUT: Duration = Duration::from_secs(75);
/// Connections kept open for reuse; more threads at once open more, and close them after.
const IDLE_CONNECTIONS: usize = 4;

/// What the C caller receives: a return code and the sentence `cis2_last_error()` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: c_int,
    pub message: String,
}

impl Error {
    pub fn new(code: c_int, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }
}

/// The agent closed the connection before answering: an idle connection it dropped (after 300 s), or
/// an agent that stopped. `cis2-ipc-client` reports it as a protocol error with this text.
fn connection_lost(error: &ClientError) -> bool {
    match error {
        ClientError::Protocol(message) => message == "the agent closed the connection",
        ClientError::Io(_) => true,
        _ => false,
    }
}

impl From<ClientError> for Error {
    fn from(error: ClientError) -> Error {
        match error {
            ClientError::Rpc { code, message } => match code {
                -32001 => Error::new(CIS2_E_NOT_SIGNED_IN, message),
                -32002 => Error::new(CIS2_E_SIGN_IN_FAILED, message),
                -32003 => Error::new(CIS2_E_NOT_ALLOWED, message),
                -32004 => Error::new(CIS2_E_LOCKED, message),
                -32005 => Error::new(CIS2_E_UNREACHABLE, message),
                // Bad params: a value the caller passed (e.g. min_valid_secs above 86400).
                -32602 => Error::new(CIS2_E_BAD_ARGUMENT, message),
                // Codes added to the protocol later land here with the agent's own sentence.
                _ => Error::new(
                    CIS2_E_PROTOCOL,
                    format!("the agent answered with error {code}: {message}"),
                ),
            },
            ClientError::Protocol(_) if connection_lost(&error) => Error::new(
                CIS2_E_NO_AGENT,
                "the agent closed the connection before answering (it may have stopped or restarted); try again",
            ),
            ClientError::Protocol(_) => Error::new(CIS2_E_PROTOCOL, error.to_string()),
            other => Error::new(CIS2_E_NO_AGENT, other.to_string()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The called-back function of `cis2_subscribe`.
pub type EventCallback = extern "C" fn(event_json: *const c_char, user: *mut c_void);

/// A `cis2_client`: where the agent is, idle connections, and the event thread if subscribed.
pub struct Cis2Client {
    endpoint: PathBuf,
    idle: Mutex<Vec<Connection>>,
    events: Mutex<Option<Subscription>>,
}

fn connect(endpoint: &Path) -> Result<Connection, Error> {
    Ok(Connection::connect(endpoint)?)
}

impl Cis2Client {
    /// Connects once, so that a missing agent is reported here (`None`: `$CIS2_AGENT_SOCK`, else the
    /// OS default socket or pipe, by the rule every client shares).
    pub fn open(endpoint: Option<&str>) -> Result<Cis2Client, Error> {
        let endpoint = match endpoint {
            None => cis2_ipc_client::default_socket_path(),
            Some("") => {
                return Err(Error::new(
                    CIS2_E_BAD_ARGUMENT,
                    "the endpoint is empty: pass NULL for the default socket or pipe, or its path",
                ));
            }
            Some(path) => PathBuf::from(path),
        };
        let first = connect(&endpoint)?;
        Ok(Cis2Client {
            endpoint,
            idle: Mutex::new(vec![first]),
            events: Mutex::new(None),
        })
    }

    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    /// One request on an idle connection (or a new one). A reused connection the agent has since
    /// closed is replaced once: the request never reached an agent that could answer it.
    fn call(&self, method: &str, params: Value, timeout: Option<Duration>) -> Result<Value, Error> {
        let mut reused = lock(&self.idle).pop();
        loop {
            let was_reused = reused.is_some();
            let mut connection = match reused.take() {
                Some(connection) => connection,
                None => connect(&self.endpoint)?,
            };
            connection.set_timeout(timeout)?;
            match connection.call(method, params.clone()) {
                Err(error) if was_reused && connection_lost(&error) => continue,
                Err(error @ ClientError::Rpc { .. }) => {
                    self.keep(connection);
                    return Err(error.into());
                }
                Err(error) => return Err(error.into()),
                Ok(result) => {
                    self.keep(connection);
                    return Ok(result);
                }
            }
        }
    }

    fn keep(&self, connection: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(connection);
        }
    }

    /// The `status` result as JSON text.
    pub fn status_json(&self) -> Result<String, Error> {
        Ok(self
            .call("status", json!({}), Some(CALL_TIMEOUT))?
            .to_string())
    }

    /// The signed-in User as JSON text.
    pub fn whoami_json(&self) -> Result<String, Error> {
        Ok(self
            .call("whoami", json!({}), Some(CALL_TIMEOUT))?
            .to_string())
    }

    /// The bare access token. With `may_sign_in`, nobody signed in (or a locked session) starts the
    /// agent's sign-in in the browser (`login`, which waits for the person) and then asks again.
    pub fn token(&self, min_valid_secs: u32, may_sign_in: bool) -> Result<String, Error> {
        let params = json!({ "min_valid_secs": min_valid_secs });
        let answer = match self.call("token", params.clone(), Some(CALL_TIMEOUT)) {
            Err(error)
                if may_sign_in
                    && (error.code == CIS2_E_NOT_SIGNED_IN || error.code == CIS2_E_LOCKED) =>
            {
                // The agent bounds the browser part itself (login_timeout_secs, 3,700 s at most).
                self.call("login", json!({}), None)?;
                self.call("token", params, Some(CALL_TIMEOUT))?
            }
            other => other?,
        };
        match answer.get("access_token").and_then(Value::as_str) {
            Some(token) => Ok(token.to_string()),
            None => Err(Error::new(
                CIS2_E_PROTOCOL,
                "the agent's token answer has no access_token",
            )),
        }
    }

    /// Replaces any earlier subscription with one calling `on_event` (none: just stops it). The agent
    /// must accept `subscribe` (the client policy applies) before this returns 0.
    pub fn subscribe(&self, on_event: Option<EventCallback>, user: usize) -> Result<(), Error> {
        let earlier = lock(&self.events).take();
        drop(earlier);
        let Some(on_event) = on_event else {
            return Ok(());
        };
        let mut connection = connect(&self.endpoint)?;
        connection.set_timeout(Some(CALL_TIMEOUT))?;
        connection.call("subscribe", json!({}))?;
        connection.set_timeout(None)?;
        let shutdown = connection.shutdown_handle()?;
        let stopped = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("cis2-client-events".into())
            .spawn({
                let stopped = stopped.clone();
                move || deliver_events(connection, on_event, user, &stopped)
            })
            .map_err(|e| {
                Error::new(
                    CIS2_E_PROTOCOL,
                    format!("could not start the event thread: {e}"),
                )
            })?;
        *lock(&self.events) = Some(Subscription {
            stopped,
            shutdown,
            thread: Some(thread),
        });
        Ok(())
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Error {
        Error::from(ClientError::Io(error))
    }
}

struct Subscription {
    stopped: Arc<AtomicBool>,
    shutdown: Shutdown,
    thread: Option<JoinHandle<()>>,
}

/// Once this returns, the callback is not running and will not be called again (unless it is the
/// callback itself that closes the handle: its thread ends when the callback returns).
impl Drop for Subscription {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.shutdown.shutdown();
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// The event thread: each event's `params` as JSON; when the connection ends without the caller
/// asking, one last `{"type":"disconnected","reason":…}` made by the library.
fn deliver_events(
    mut connection: Connection,
    on_event: EventCallback,
    user: usize,
    stopped: &AtomicBool,
) {
    loop {
        let event = connection.next_event();
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        match event {
            Ok(event) => call_back(on_event, user, &event),
            Err(error) => {
                let reason = Error::from(error).message;
                call_back(
                    on_event,
                    user,
                    &json!({"type": "disconnected", "reason": reason}),
                );
                return;
            }
        }
    }
}

fn call_back(on_event: EventCallback, user: usize, event: &Value) {
    // serde_json escapes a NUL inside a string, so the text has none.
    if let Ok(text) = CString::new(event.to_string()) {
        on_event(text.as_ptr(), std::ptr::with_exposed_provenance_mut(user));
    }
}

impl Drop for Cis2Client {
    fn drop(&mut self) {
        drop(lock(&self.events).take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_agent_error_maps_to_its_stable_code_and_keeps_the_agents_sentence() {
        let rpc = |code| ClientError::Rpc {
            code,
            message: "the agent's sentence".into(),
        };
        for (code, expected) in [
            (-32001, CIS2_E_NOT_SIGNED_IN),
            (-32002, CIS2_E_SIGN_IN_FAILED),
            (-32003, CIS2_E_NOT_ALLOWED),
            (-32004, CIS2_E_LOCKED),
            (-32005, CIS2_E_UNREACHABLE),
            (-32602, CIS2_E_BAD_ARGUMENT),
        ] {
            assert_eq!(
                Error::from(rpc(code)),
                Error::new(expected, "the agent's sentence")
            );
        }
        // A code this release does not know (a later protocol's) is a protocol error naming it.
        let unknown = Error::from(rpc(-32009));
        assert_eq!(unknown.code, CIS2_E_PROTOCOL);
        assert!(
            unknown.message.contains("-32009") && unknown.message.contains("the agent's sentence"),
            "{}",
            unknown.message
        );
        let closed = Error::from(ClientError::Protocol(
            "the agent closed the connection".into(),
        ));
        assert_eq!(closed.code, CIS2_E_NO_AGENT);
        let garbage = Error::from(ClientError::Protocol("expected value".into()));
        assert_eq!(garbage.code, CIS2_E_PROTOCOL);
    }

    #[test]
    fn opening_an_endpoint_where_no_agent_listens_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("agent.sock");
        let error = Cis2Client::open(Some(path.to_str().unwrap()))
            .err()
            .expect("no agent");
        assert_eq!(error.code, CIS2_E_NO_AGENT);
        assert!(
            error.message.contains(path.to_str().unwrap()),
            "{}",
            error.message
        );
        let empty = Cis2Client::open(Some("")).err().expect("empty endpoint");
        assert_eq!(empty.code, CIS2_E_BAD_ARGUMENT);
    }
}
