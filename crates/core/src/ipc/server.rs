//! What every transport's server shares, once it has accepted a peer it knows: frames lines (64 KiB at
//! most), runs requests concurrently per connection, forwards events to subscribers through a bounded
//! queue (a subscriber that falls behind gets a `resync` event, never silence and never a stalled agent),
//! and bounds idle time and request time. The listeners are [`super::socket`] (Unix socket, Linux and
//! macOS) and [`super::pipe`] (named pipe, Windows); each accepts same-user peers only, bounds
//! connections, and hands each connection here as any byte stream.

use super::MAX_LINE_BYTES;
use super::framing::{Line, read_line};
use super::protocol::{self, INVALID_REQUEST};
use crate::agent::{Agent, ConnectionGrant};
use crate::peer::Peer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, broadcast, mpsc};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Requests one connection may have running at once.
    pub max_in_flight: usize,
    /// A connection that sends nothing and subscribes to nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Any request but `login` must finish within this.
    pub request_timeout: Duration,
    /// Lines queued to one client before events are dropped for it (and a resync promised).
    pub queue: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 256,
            max_in_flight: 16,
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            queue: 256,
        }
    }
}

/// Takes a connection slot for `stream` (or tells the client the agent is full), identifies the peer
/// and serves it on a task of its own: `quick` answers from what is known at once (a cached hash),
/// else `identify` runs off the runtime's threads (it may read and hash a file).
pub(super) fn spawn_connection<S, Q, I>(
    stream: S,
    agent: &Agent,
    options: &Arc<ServeOptions>,
    connections: &Arc<Semaphore>,
    quick: Q,
    identify: I,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Q: FnOnce(&Agent) -> Option<Peer> + Send + 'static,
    I: FnOnce(&Agent) -> Peer + Send + 'static,
{
    let Ok(permit) = connections.clone().try_acquire_owned() else {
        tokio::spawn(refuse_busy(stream));
        return;
    };
    let agent = agent.clone();
    let options = options.clone();
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
        connection(stream, agent, Arc::new(peer), options).await;
        drop(permit);
    });
}

/// Tells a client the agent is full, then drops it.
async fn refuse_busy<S: AsyncWrite + Unpin>(mut stream: S) {
    let line = protocol::error_response(
        Value::Null,
        -32000,
        "The agent has too many connections open; close some clients and try again.",
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(format!("{line}\n").as_bytes()),
    )
    .await;
}

/// Serves one connection of a known peer until it closes, idles out or the agent stops.
async fn connection<S>(stream: S, agent: Agent, peer: Arc<Peer>, options: Arc<ServeOptions>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, mut write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let (tx, mut rx) = mpsc::channel::<String>(options.queue);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if write_half.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(options.max_in_flight));
    let subscribed = Arc::new(AtomicBool::new(false));
    let subscription: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let grant = Arc::new(tokio::sync::Mutex::new(ConnectionGrant::default()));
    // Orders this connection's identity-bearing answers against its events (see `deliver`).
    let order = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let idle = !subscribed.load(Ordering::Relaxed)
            && in_flight.available_permits() == options.max_in_flight;
        let read = if idle {
            match tokio::time::timeout(options.idle_timeout, read_line(&mut reader)).await {
                Ok(read) => read,
                Err(_) => break,
            }
        } else {
            read_line(&mut reader).await
        };
        let line = match read {
            Ok(Line::Complete(line)) => line,
            Ok(Line::TooLong) => {
                let response = protocol::error_response(
                    Value::Null,
                    INVALID_REQUEST,
                    &format!(
                        "The line is longer than {} KiB and was skipped.",
                        MAX_LINE_BYTES / 1024
                    ),
                );
                if tx.send(format!("{response}\n")).await.is_err() {
                    break;
                }
                continue;
            }
            Ok(Line::Eof) | Err(_) => break,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match protocol::parse(&line) {
            Ok(request) => request,
            Err(response) => {
                if tx.send(format!("{response}\n")).await.is_err() {
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
        tokio::spawn(async move {
            let generation = agent.generation();
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
                // Hand-over: an answer about the previous clinician is never delivered after this
                // connection was told they signed out. The check and the send happen under the
                // same lock the event forwarder takes, and the generation changes before the event.
                let _in_order = order.lock().await;
                let outcome = match outcome {
                    Ok(_) if agent.generation() != generation && matches!(request.method.as_str(), "token" | "whoami") => Err((
                        -32001,
                        "The clinician signed in here changed while this request was answered; ask again.".to_string(),
                    )),
                    Ok(_) if agent.generation() != generation && request.method == "status" => {
                        protocol::call(&agent, &peer, &grant, &request).await
                    }
                    outcome => outcome,
                };
                let response = match outcome {
                    Ok(result) => protocol::result_response(id, result),
                    Err((code, message)) => protocol::error_response(id, code, &message),
                };
                let _ = tx.send(format!("{response}\n")).await;
            }
            drop(permit);
        });
    }
    if let Some(task) = subscription
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        task.abort();
    }
    drop(tx);
    // Let queued answers go out, then stop.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Forwards events into the client's queue without ever waiting on the client: when the queue is full
/// an event is dropped and the client is owed a `resync` event, sent as soon as the queue has room.
async fn forward_events(
    mut events: broadcast::Receiver<crate::agent::Event>,
    tx: mpsc::Sender<String>,
    order: Arc<tokio::sync::Mutex<()>>,
) {
    let resync = json!({"jsonrpc": "2.0", "method": "event", "params": {"type": "resync", "reason": "events were dropped because this client read too slowly; ask for status"}});
    let mut owe_resync = false;
    loop {
        tokio::select! {
            permit = tx.reserve(), if owe_resync => {
                let Ok(permit) = permit else { return };
                permit.send(format!("{resync}\n"));
                owe_resync = false;
            }
            received = events.recv() => match received {
                Ok(event) if !owe_resync => {
                    let line = json!({"jsonrpc": "2.0", "method": "event", "params": event});
                    let _in_order = order.lock().await;
                    match tx.try_send(format!("{line}\n")) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => owe_resync = true,
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
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

    #[tokio::test]
    async fn a_slow_subscriber_gets_a_resync_once_its_queue_drains() {
        use crate::agent::Event;
        let (events, _) = broadcast::channel(64);
        let (tx, mut rx) = mpsc::channel(2);
        let forwarder = tokio::spawn(forward_events(events.subscribe(), tx, Arc::default()));
        tokio::task::yield_now().await;
        for expires_at in 0..5 {
            events.send(Event::TokenRefreshed { expires_at }).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Two fitted; the rest were dropped. Reading makes room, and the resync follows unprompted.
        let mut seen = Vec::new();
        for _ in 0..3 {
            let line = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            seen.push(value["params"]["type"].as_str().unwrap().to_string());
        }
        assert_eq!(seen, vec!["token_refreshed", "token_refreshed", "resync"]);
        events.send(Event::Unlocked).unwrap();
        let line = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            line.contains("unlocked"),
            "events flow again after the resync: {line}"
        );
        forwarder.abort();
    }
}
