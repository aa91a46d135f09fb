//! What every transport's server shares, once a listener has accepted a peer of this user: frames
//! lines (64 KiB at most), runs requests concurrently per connection, forwards events to subscribers
//! through a bounded queue (a subscriber that falls behind gets a `resync` event, never silence and
//! never a stalled agent), and bounds connections (in all, and per program), idle time, request time
//! and the bytes queued for a client (one that stops reading its answers is disconnected). The calling
//! program's identity is checked again at each request: a connection whose program has since started
//! another one (`exec`) is closed. The listeners are [`super::socket`] (Unix socket, Linux and macOS)
//! and [`super::pipe`] (named pipe, Windows); each accepts same-user peers only and hands each
//! connection here, as any byte stream, through [`spawn_connection`].

use super::MAX_LINE_BYTES;
use super::framing::{Line, read_line};
use super::outbox::{Outbox, Queued};
use super::protocol::{self, INVALID_REQUEST};
use crate::agent::{Agent, ConnectionGrant};
use crate::peer::{Peer, ProcessHold};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, broadcast};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Connections one program (one executable hash; all unidentified programs together) may hold, so
    /// that no one program can take every slot.
    pub max_connections_per_program: usize,
    /// Requests one connection may have running at once.
    pub max_in_flight: usize,
    /// A connection that sends nothing and subscribes to nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Any request but `login` must finish within this.
    pub request_timeout: Duration,
    /// Lines queued to one client before events are dropped for it (and a resync promised).
    pub queue: usize,
    /// Bytes queued to one client at most: an answer that would go past this means the client has
    /// stopped reading, and it is disconnected (an event is dropped instead, and a resync promised).
    pub max_queued_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 256,
            max_connections_per_program: 64,
            max_in_flight: 16,
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            queue: 256,
            max_queued_bytes: 256 * 1024,
        }
    }
}

/// What a listener's connections share: the options, and the bounds on connections in all and per
/// program.
pub(super) struct Limits {
    options: Arc<ServeOptions>,
    connections: Arc<Semaphore>,
    programs: ProgramSlots,
}

impl Limits {
    pub(super) fn new(options: ServeOptions) -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(options.max_connections)),
            programs: ProgramSlots::default(),
            options: Arc::new(options),
        }
    }
}

/// Takes a connection slot for `stream` (or tells the client the agent is full), identifies the peer
/// and serves it on a task of its own: `quick` answers from what is known at once (a cached hash),
/// else `identify` runs off the runtime's threads (it may read and hash a file). `pid` is the peer's
/// process as the listener learnt it: its identity is taken here at once, before anything can wait,
/// and the identification must be of that same program. Then the per-program bound applies.
pub(super) fn spawn_connection<S, Q, I>(
    stream: S,
    agent: &Agent,
    limits: &Limits,
    pid: Option<i32>,
    quick: Q,
    identify: I,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Q: FnOnce(&Agent) -> Option<Peer> + Send + 'static,
    I: FnOnce(&Agent) -> Peer + Send + 'static,
{
    // Held for the whole connection: the per-request re-check asks this very process.
    let hold = pid.map(ProcessHold::open).unwrap_or_default();
    let connected_as = hold.identity();
    let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
        tokio::spawn(refuse(stream, TOO_MANY_CONNECTIONS.to_string()));
        return;
    };
    let agent = agent.clone();
    let options = limits.options.clone();
    let programs = limits.programs.clone();
    tokio::spawn(async move {
        let peer = match quick(&agent) {
            Some(peer) => peer,
            None => {
                let slow = agent.clone();
                tokio::task::spawn_blocking(move || identify(&slow))
                    .await
                    .unwrap_or_default()
            }
        };
        if peer.process != connected_as {
            refuse(stream, PROGRAM_CHANGED.to_string()).await;
            return;
        }
        let Some(_slot) = programs.take(&peer, options.max_connections_per_program) else {
            let why = format!(
                "{} already has {} connections to the agent open, the most one program may have; close some and try again.",
                peer.describe(),
                options.max_connections_per_program
            );
            refuse(stream, why).await;
            return;
        };
        connection(stream, agent, Arc::new(peer), hold, options).await;
        drop(permit);
    });
}

const TOO_MANY_CONNECTIONS: &str =
    "The agent has too many connections open; close some clients and try again.";
const PROGRAM_CHANGED: &str = "The program on this connection is no longer the one that connected (it started another program); connect again.";

/// Connections held per program: keyed by the executable's hash, all unidentified programs together.
#[derive(Clone, Default)]
struct ProgramSlots(Arc<std::sync::Mutex<HashMap<Option<String>, usize>>>);

/// One connection's place in [`ProgramSlots`], given back when dropped.
struct ProgramSlot {
    slots: ProgramSlots,
    program: Option<String>,
}

impl ProgramSlots {
    fn take(&self, peer: &Peer, most: usize) -> Option<ProgramSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(peer.sha256.clone()).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(ProgramSlot {
            slots: self.clone(),
            program: peer.sha256.clone(),
        })
    }
}

impl Drop for ProgramSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.program) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.program);
            }
        }
    }
}

/// Whether the process behind `peer` (held by `hold`, the process that was identified) still runs the
/// program that was identified.
fn still_the_same_program(peer: &Peer, hold: &ProcessHold) -> bool {
    match (peer.pid, peer.process) {
        (Some(_), Some(identified)) => hold.still_runs(&identified),
        // Where the OS gives no process identity there is nothing to compare. On Windows (the pipe)
        // that is always so: the pipe server held the client's process open while identifying it, so
        // its id was not reused, and a Windows process cannot replace its own image (no `exec`).
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

/// Answers a connection that is not served with one error line, then closes it. What the client sends
/// meanwhile is read and dropped for a moment: closing at once would make a client that writes its
/// request before reading fail with EPIPE and never see why.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(stream: S, why: String) {
    use tokio::io::AsyncReadExt;
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    let line = protocol::error_response(&protocol::Id::null(), -32000, &why);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_half.write_all(format!("{line}\n").as_bytes()),
    )
    .await;
    let _ = write_half.shutdown().await;
    let mut ignored = (&mut read_half).take(MAX_LINE_BYTES as u64);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::copy(&mut ignored, &mut tokio::io::sink()),
    )
    .await;
}

/// Serves one connection of a known peer until it closes, idles out or the agent stops.
async fn connection<S>(
    stream: S,
    agent: Agent,
    peer: Arc<Peer>,
    hold: ProcessHold,
    options: Arc<ServeOptions>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Held until this connection has written its last line: the agent's stop waits for that.
    let mut stopping = agent.stopping_signal();
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let (tx, writer) = Outbox::new(write_half, options.queue, options.max_queued_bytes);
    let writer = tokio::spawn(writer.run());
    let in_flight = Arc::new(Semaphore::new(options.max_in_flight));
    let subscribed = Arc::new(AtomicBool::new(false));
    let subscription: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let grant = Arc::new(tokio::sync::Mutex::new(ConnectionGrant::default()));
    // Orders this connection's identity-bearing answers against its events (see `deliver`).
    let order = Arc::new(tokio::sync::Mutex::new(()));
    let mut agent_stopped = false;
    loop {
        let idle = !subscribed.load(Ordering::Relaxed)
            && in_flight.available_permits() == options.max_in_flight;
        let idle_limit = if idle {
            options.idle_timeout
        } else {
            Duration::MAX
        };
        let read = tokio::select! {
            read = tokio::time::timeout(idle_limit, read_line(&mut reader)) => match read {
                Ok(read) => read,
                Err(_) => break,
            },
            () = tx.stalled() => {
                tracing::warn!(peer = ?peer.describe(), "disconnected a client that stopped reading its answers");
                break;
            }
            _ = stopping.wait_for(|stopping| *stopping) => {
                agent_stopped = true;
                break;
            }
        };
        let line = match read {
            Ok(Line::Complete(line)) => line,
            Ok(Line::TooLong) => {
                let response = protocol::error_response(
                    &protocol::Id::null(),
                    INVALID_REQUEST,
                    &format!(
                        "The line is longer than {} KiB and was skipped.",
                        MAX_LINE_BYTES / 1024
                    ),
                );
                if !tx.answer(format!("{response}\n")) {
                    break;
                }
                continue;
            }
            Ok(Line::Eof) | Err(_) => break,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // Whatever the line holds: a connection whose program is no longer the one identified is
        // answered nothing more.
        if !still_the_same_program(&peer, &hold) {
            let id = protocol::parse(&line)
                .ok()
                .and_then(|request| request.id)
                .unwrap_or_else(protocol::Id::null);
            tx.answer(format!(
                "{}\n",
                protocol::error_response(&id, -32003, PROGRAM_CHANGED)
            ));
            break;
        }
        let request = match protocol::parse(&line) {
            Ok(request) => request,
            Err(response) => {
                if !tx.answer(format!("{response}\n")) {
                    break;
                }
                continue;
            }
        };

        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let agent = agent.clone();
        let tx = tx.clone();
        let (peer, grant, subscription, subscribed, order) = (
            peer.clone(),
            grant.clone(),
            subscription.clone(),
            subscribed.clone(),
            order.clone(),
        );
        // Sign-in and role change wait for a person in a browser; everything else must be quick.
        let timeout = if matches!(request.method.as_str(), "login" | "change_role") {
            Duration::from_secs(3700)
        } else {
            options.request_timeout
        };
        let answering = async move {
            let (generation, locks) = (agent.generation(), agent.lock_count());
            let call = protocol::call(&agent, &peer, &grant, &request);
            let outcome = match tokio::time::timeout(timeout, call).await {
                Ok(outcome) => outcome,
                Err(_) => Err((
                    -32000,
                    "The request took too long and was abandoned.".to_string(),
                )),
            };
            if request.method == "subscribe" && outcome.is_ok() {
                let mut slot = subscription.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    subscribed.store(true, Ordering::Relaxed);
                    *slot = Some(tokio::spawn(forward_events(
                        agent.subscribe(),
                        tx.clone(),
                        order.clone(),
                    )));
                }
            }
            if let Some(id) = request.id.clone() {
                // Hand-over and lock: an answer about the previous clinician is never delivered after
                // this connection was told they signed out, nor a token or identity after it was told
                // the session locked. The check and the send happen under the same lock the event
                // forwarder takes, and the generation and lock count change before the event.
                let _in_order = order.lock().await;
                let outcome = match outcome {
                    Ok(_) if agent.generation() != generation && matches!(request.method.as_str(), "token" | "whoami") => Err((
                        -32001,
                        "The clinician signed in here changed while this request was answered; ask again.".to_string(),
                    )),
                    Ok(_) if agent.lock_count() != locks && matches!(request.method.as_str(), "token" | "whoami") => Err(match agent.check_unlocked() {
                        Err(locked) => (locked.code(), locked.to_string()),
                        Ok(()) => (-32004, "The session was locked while this request was answered; ask again.".to_string()),
                    }),
                    Ok(_) if (agent.generation() != generation || agent.lock_count() != locks) && request.method == "status" => {
                        protocol::call(&agent, &peer, &grant, &request).await
                    }
                    outcome => outcome,
                };
                let response = match outcome {
                    Ok(result) => protocol::result_response(&id, &result),
                    Err((code, message)) => protocol::error_response(&id, code, &message),
                };
                tx.answer(format!("{response}\n"));
            }
            drop(permit);
        };
        run_or_spawn(answering);
    }
    let forwarder = subscription
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(mut task) = forwarder {
        // Stopping: the forwarder ends once it has queued `agent_stopping`, the subscriber's last
        // event; otherwise nobody is left to read events.
        if !agent_stopped
            || tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
    if agent_stopped {
        // What is queued goes out, then the connection closes, whatever requests are still running
        // (they hold outboxes, so the queue alone would never end).
        tx.finish();
    }
    drop(tx);
    // Let queued answers go out, then stop. A writer still blocked on a client that does not read is
    // ended: it holds the socket (and its queue) open for as long as it lives.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Runs a request here if it finishes without waiting (a token from the cache whose audit batch this
/// request writes itself), else on a task of its own, so that requests of one connection still run
/// side by side. Most requests finish at once, and a task per request (spawned, scheduled, perhaps
/// stolen by the other worker) was a good part of an answer's time under load.
fn run_or_spawn(request: impl Future<Output = ()> + Send + 'static) {
    let mut request = Box::pin(request);
    // Polled with a waker that does nothing: a request that is not done is handed to a task, whose
    // first poll registers the real waker (tokio's waits re-register on every poll, none is lost).
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    if request.as_mut().poll(&mut context).is_pending() {
        tokio::spawn(request);
    }
}

/// Forwards events into the client's queue without ever waiting on the client: when the queue is full
/// an event is dropped and the client is owed a `resync` event, sent as soon as the queue has room.
async fn forward_events(
    mut events: broadcast::Receiver<crate::agent::Event>,
    outbox: Outbox,
    order: Arc<tokio::sync::Mutex<()>>,
) {
    let resync = json!({"jsonrpc": "2.0", "method": "event", "params": {"type": "resync", "reason": "events were dropped because this client read too slowly; ask for status"}});
    let mut owe_resync = false;
    loop {
        tokio::select! {
            () = outbox.room(), if owe_resync => {
                match outbox.try_queue(format!("{resync}\n")) {
                    Queued::Yes => owe_resync = false,
                    Queued::NoRoom => {}
                    Queued::Closed => return,
                }
            }
            received = events.recv() => match received {
                // The last event, sent even over an owed resync: after it the connection closes.
                Ok(event @ crate::agent::Event::AgentStopping { .. }) => {
                    let line = json!({"jsonrpc": "2.0", "method": "event", "params": event});
                    let _in_order = order.lock().await;
                    let _ = outbox.try_queue(format!("{line}\n"));
                    return;
                }
                Ok(event) if !owe_resync => {
                    let line = json!({"jsonrpc": "2.0", "method": "event", "params": event});
                    let _in_order = order.lock().await;
                    match outbox.try_queue(format!("{line}\n")) {
                        Queued::Yes => {}
                        Queued::NoRoom => owe_resync = true,
                        Queued::Closed => return,
                    }
                }
                // While a resync is owed, the events it covers are not sent: status tells all.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => owe_resync = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[cfg(feature = "sandbox")]
    #[tokio::test]
    async fn a_stopping_agent_tells_subscribers_then_closes_even_with_a_request_running() {
        use crate::agent::AgentOptions;
        use crate::browser::Browser;
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::sandbox();
        config.agent.data_dir = Some(dir.path().to_path_buf());
        let agent = Agent::start(AgentOptions::new(config, Browser::from_env(true)))
            .await
            .unwrap();
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(connection(
            server_end,
            agent.clone(),
            Arc::new(Peer::default()),
            ProcessHold::default(),
            Arc::new(ServeOptions::default()),
        ));
        let (read, mut write) = tokio::io::split(client);
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"subscribe\"}\n")
            .await
            .unwrap();
        let answer: Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(answer["id"], 1);
        // A sign-in waiting for a browser nobody uses: it must not hold the connection open.
        write
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"login\",\"params\":{\"timeout_secs\":600}}\n")
            .await
            .unwrap();
        while agent.status().state != crate::agent::SessionState::SigningIn {
            tokio::task::yield_now().await;
        }
        agent.stop(Duration::from_secs(30)).await;
        // `stop` returned: the connection has written its last line and closed.
        served.await.unwrap();
        let last: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(last["method"], "event");
        assert_eq!(
            last["params"],
            json!({"type": "agent_stopping", "session_survives": false})
        );
        assert_eq!(
            lines.next_line().await.unwrap(),
            None,
            "then the connection closes"
        );
        // A connection made after the stop closes at once.
        let (late, late_end) = tokio::io::duplex(1024);
        connection(
            late_end,
            agent.clone(),
            Arc::new(Peer::default()),
            ProcessHold::default(),
            Arc::new(ServeOptions::default()),
        )
        .await;
        drop(late);
    }

    #[tokio::test]
    async fn a_refused_client_that_writes_first_still_reads_why() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let (client, server_end) = tokio::io::duplex(1024);
        let refusing = tokio::spawn(refuse(server_end, TOO_MANY_CONNECTIONS.to_string()));
        let (read, mut write) = tokio::io::split(client);
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        // The refusal is written; the client sends its request only now, as one that writes
        // without reading first would, and its write still goes through.
        write
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}\n")
            .await
            .expect("the agent still reads what the refused client sends");
        drop(write);
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["error"]["code"], -32000);
        assert_eq!(answer["error"]["message"], TOO_MANY_CONNECTIONS);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after the refusal");
        refusing.await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_a_resync_once_its_queue_drains() {
        use crate::agent::Event;
        use tokio::io::AsyncBufReadExt;
        let (events, _) = broadcast::channel(64);
        // A client that has not read yet: its socket takes 16 bytes, the queue two lines.
        let (client, server_end) = tokio::io::duplex(16);
        let (outbox, writer) = Outbox::new(server_end, 2, 64 * 1024);
        let writing = tokio::spawn(writer.run());
        let forwarder = tokio::spawn(forward_events(events.subscribe(), outbox, Arc::default()));
        tokio::task::yield_now().await;
        for expires_at in 0..5 {
            events.send(Event::TokenRefreshed { expires_at }).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Two fitted; the rest were dropped. Reading makes room, and the resync follows unprompted.
        let mut lines = BufReader::new(client).lines();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let line = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            seen.push(value["params"]["type"].as_str().unwrap().to_string());
        }
        assert_eq!(seen, vec!["token_refreshed", "token_refreshed", "resync"]);
        events.send(Event::Unlocked).unwrap();
        let line = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            line.contains("unlocked"),
            "events flow again after the resync: {line}"
        );
        forwarder.abort();
        let _ = forwarder.await;
        writing.await.unwrap();
        assert_eq!(
            lines.next_line().await.unwrap(),
            None,
            "closed once no outbox is left"
        );
    }

    #[tokio::test]
    async fn lines_from_many_tasks_reach_a_slow_reader_whole_and_in_the_order_sent() {
        use tokio::io::AsyncBufReadExt;
        // 7 bytes of socket: most lines go out part directly, part from the queue.
        let (client, server_end) = tokio::io::duplex(7);
        let (outbox, writer) = Outbox::new(server_end, 10_000, 1 << 20);
        let writing = tokio::spawn(writer.run());
        let reading = tokio::spawn(async move {
            let mut lines = BufReader::new(client).lines();
            let mut got = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                got.push(line);
                // A reader slower than the writers, now and then.
                if got.len() % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            got
        });
        let senders: Vec<_> = (0..4)
            .map(|task| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for i in 0..250 {
                        assert!(outbox.answer(format!("{task} {i} {}\n", "x".repeat(i % 23))));
                        if i % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        drop(outbox);
        writing.await.unwrap();
        let got = reading.await.unwrap();
        assert_eq!(got.len(), 1000);
        for task in 0..4 {
            let mine: Vec<&String> = got
                .iter()
                .filter(|line| line.starts_with(&format!("{task} ")))
                .collect();
            let expected: Vec<String> = (0..250)
                .map(|i| format!("{task} {i} {}", "x".repeat(i % 23)))
                .collect();
            assert_eq!(mine.len(), 250);
            assert!(
                mine.iter().zip(&expected).all(|(a, b)| *a == b),
                "task {task}'s lines whole and in order"
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_found_out_by_the_bounds() {
        let (client, server_end) = tokio::io::duplex(64);
        let (outbox, writer) = Outbox::new(server_end, 1000, 4 * 1024);
        let _writing = tokio::spawn(writer.run());
        let line = format!("{}\n", "y".repeat(100));
        let mut answered = 0;
        while outbox.answer(line.clone()) {
            answered += 1;
            assert!(answered < 1000, "the byte bound never applied");
        }
        // 4 KiB of lines queued (the first counts whole, though the socket took 64 bytes of it).
        assert_eq!(answered, 4 * 1024 / line.len());
        tokio::time::timeout(Duration::from_secs(1), outbox.stalled())
            .await
            .expect("the connection is told to close");
        drop(client);
    }
}
