//! Ended sessions, from the back-channel endpoint to every agent's event stream. One process fans out in
//! memory; with `redis_url` every instance appends to one Redis stream and delivers what it reads back
//! from it, so a logout received by one instance reaches an agent subscribed to another. Each instance
//! reads on from the last entry it saw, so one whose connection to Redis broke catches up on what was
//! appended meanwhile (pub/sub would have lost it); a new instance starts ten minutes back. A short
//! memory of recently ended sessions covers an agent that was reconnecting when its logout arrived.

use cis2_oidc::logout::EndedSession;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The Redis stream all instances share.
pub const STREAM: &str = "cis2-relay:logouts";
/// About how many entries the stream keeps: far more than are ever read back.
const STREAM_LENGTH: usize = 10_000;
/// How long one read waits for news before asking again.
const READ_BLOCK: Duration = Duration::from_secs(5);
/// How long an ended session is remembered for agents that subscribe late.
pub const REMEMBER_FOR: Duration = Duration::from_secs(600);
const REMEMBER_AT_MOST: usize = 50_000;

/// A logout as it reaches the event streams: the ended session, and when the logout happened (ms since
/// the Unix epoch; one caught up on from Redis may be minutes old).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub session: EndedSession,
    pub at_ms: u64,
}

#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

struct Inner {
    local: broadcast::Sender<Ended>,
    recent: Mutex<VecDeque<(Instant, EndedSession)>>,
    redis: Option<redis::Client>,
    /// The connection logouts are appended on, made at the first and remade after a failure.
    appender: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    redis_up: AtomicBool,
}

impl Fanout {
    /// In memory only.
    pub fn memory() -> Fanout {
        Fanout::build(None)
    }

    /// Shared through Redis; starts the subscriber that feeds this instance (it reconnects on its own).
    pub fn redis(url: &str) -> Result<Fanout, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let fanout = Fanout::build(Some(client));
        let weak = Arc::downgrade(&fanout.inner);
        tokio::spawn(async move { subscribe_loop(weak).await });
        Ok(fanout)
    }

    fn build(redis: Option<redis::Client>) -> Fanout {
        let (local, _) = broadcast::channel(1024);
        Fanout {
            inner: Arc::new(Inner {
                local,
                recent: Mutex::new(VecDeque::new()),
                redis,
                appender: tokio::sync::Mutex::new(None),
                redis_up: AtomicBool::new(false),
            }),
        }
    }

    pub fn uses_redis(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Whether the Redis subscription is live (always true without Redis).
    pub fn redis_up(&self) -> bool {
        self.inner.redis.is_none() || self.inner.redis_up.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Ended> {
        self.inner.local.subscribe()
    }

    /// Whether the session `sid` ended within [`REMEMBER_FOR`]. Only logouts naming that `sid`
    /// count: one naming only the person (`sub`) would otherwise end every new session they start in
    /// the next ten minutes.
    pub fn recently_ended(&self, sid: &str) -> bool {
        let recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .any(|(_, ended)| ended.sid.as_deref() == Some(sid))
    }

    /// Passes on, here only, a logout that happened `age` ago and is learned of only now (an instance
    /// catching up on Redis after an outage does this).
    pub fn deliver_late(&self, ended: EndedSession, age: Duration) {
        self.inner.deliver_aged(ended, age);
    }

    /// Announces an ended session to every instance. Without Redis, or when Redis cannot take it, the
    /// agents connected here are told directly (a duplicate later is harmless: signing out is idempotent).
    pub async fn publish(&self, ended: EndedSession) {
        // While the Redis subscription is down, this instance would not hear its own message back.
        let redis_up = self.redis_up();
        if let Some(client) = &self.inner.redis {
            let payload = serde_json::to_string(&ended).unwrap_or_default();
            let published = async {
                let mut appender = self.inner.appender.lock().await;
                let mut conn = match appender.as_ref() {
                    Some(conn) => conn.clone(),
                    None => {
                        let conn = client.get_multiplexed_async_connection().await?;
                        *appender = Some(conn.clone());
                        conn
                    }
                };
                drop(appender);
                redis::cmd("XADD")
                    .arg(STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_LENGTH)
                    .arg("*")
                    .arg("ended")
                    .arg(payload)
                    .query_async::<String>(&mut conn)
                    .await
            };
            let outcome = tokio::time::timeout(Duration::from_secs(3), published).await;
            if !matches!(outcome, Ok(Ok(_))) {
                // Made afresh next time: the connection may be what failed.
                *self.inner.appender.lock().await = None;
            }
            match outcome {
                Ok(Ok(_)) if redis_up => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "Redis refused the logout event; telling this instance's agents only")
                }
                Err(_) => tracing::error!(
                    "Redis did not take the logout event within 3 s; telling this instance's agents only"
                ),
            }
        }
        self.inner.deliver_aged(ended, Duration::ZERO);
    }
}

impl Inner {
    /// Delivers a logout that happened `age` ago (one caught up on from Redis may be minutes old): to
    /// every stream open here, and to the memory for late subscribers if it is recent enough.
    fn deliver_aged(&self, ended: EndedSession, age: Duration) {
        if age <= REMEMBER_FOR {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let at = now.checked_sub(age).unwrap_or(now);
            while recent
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > REMEMBER_FOR)
                || recent.len() >= REMEMBER_AT_MOST
            {
                recent.pop_front();
            }
            recent.push_back((at, ended.clone()));
        }
        let at_ms = epoch_ms().saturating_sub(age.as_millis() as u64);
        let _ = self.local.send(Ended {
            session: ended,
            at_ms,
        });
    }
}

/// Whether `ended` is the session `sid` of `sub` (a logout by `sub` alone ends all of that person's).
pub fn matches(ended: &EndedSession, sid: &str, sub: Option<&str>) -> bool {
    match (&ended.sid, &ended.sub) {
        (Some(ended_sid), _) => ended_sid == sid,
        (None, Some(ended_sub)) => sub == Some(ended_sub.as_str()),
        (None, None) => false,
    }
}

/// Milliseconds since the Unix epoch: the clock of Redis stream ids.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The id of the stream's newest entry, `0-0` when it is empty or missing; `None` when Redis did not
/// answer (the read that follows finds out).
async fn newest_entry(conn: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    let newest: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .ok()?;
    Some(
        newest
            .ids
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_string(), |entry| entry.id),
    )
}

/// A stream id, `<ms>-<seq>` (the ms are Redis's clock when the entry was added), as numbers.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (
        ms.parse::<u64>().unwrap_or(0),
        seq.parse::<u64>().unwrap_or(0),
    )
}

/// Stream ids are ordered by time, then sequence.
fn stream_id_less(a: &str, b: &str) -> bool {
    stream_id(a) < stream_id(b)
}

/// Reads the shared stream from where this instance left off, for as long as the relay runs.
async fn subscribe_loop(weak: std::sync::Weak<Inner>) {
    // A new instance catches up on the logouts of the last ten minutes, for late subscribers.
    let mut last_id = format!(
        "{}-0",
        epoch_ms().saturating_sub(REMEMBER_FOR.as_millis() as u64)
    );
    let mut read_any = false;
    let mut retry = Duration::from_millis(200);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let Some(client) = inner.redis.clone() else {
            return;
        };
        drop(inner);
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(5)));
        match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(mut conn) => {
                if read_any
                    && let Some(newest) = newest_entry(&mut conn).await
                    && stream_id_less(&newest, &last_id)
                {
                    // The stream is older than what was read last: Redis restarted empty or the
                    // stream was deleted. Everything in it now is news.
                    last_id = "0-0".into();
                }
                loop {
                    let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                        redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(256)
                            .arg("BLOCK")
                            .arg(READ_BLOCK.as_millis() as u64)
                            .arg("STREAMS")
                            .arg(STREAM)
                            .arg(&last_id)
                            .query_async(&mut conn)
                            .await;
                    let Some(inner) = weak.upgrade() else { return };
                    let reply = match read {
                        Ok(reply) => reply,
                        Err(e) => {
                            tracing::error!(error = %e, "lost the Redis logout stream; reconnecting");
                            break;
                        }
                    };
                    if !inner.redis_up.swap(true, Ordering::Relaxed) {
                        tracing::info!("sharing logout events through Redis");
                    }
                    retry = Duration::from_millis(200);
                    let now_ms = epoch_ms();
                    for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                        let (at_ms, _) = stream_id(&entry.id);
                        let payload: Option<String> = entry.get("ended");
                        match payload.and_then(|p| serde_json::from_str::<EndedSession>(&p).ok()) {
                            Some(ended) => inner.deliver_aged(
                                ended,
                                Duration::from_millis(now_ms.saturating_sub(at_ms)),
                            ),
                            None => {
                                tracing::warn!(
                                    "ignored a malformed entry in the Redis logout stream"
                                )
                            }
                        }
                        last_id = entry.id;
                        read_any = true;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot reach Redis for logout events"),
        }
        if let Some(inner) = weak.upgrade() {
            inner.redis_up.store(false, Ordering::Relaxed);
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(sid: Option<&str>, sub: Option<&str>) -> EndedSession {
        EndedSession {
            sid: sid.map(str::to_string),
            sub: sub.map(str::to_string),
        }
    }

    #[test]
    fn a_sid_ends_that_session_and_a_bare_sub_ends_all_of_the_person() {
        assert!(matches(&ended(Some("s1"), Some("u1")), "s1", Some("u1")));
        assert!(!matches(&ended(Some("s2"), Some("u1")), "s1", Some("u1")));
        assert!(matches(&ended(None, Some("u1")), "s1", Some("u1")));
        assert!(!matches(&ended(None, Some("u2")), "s1", Some("u1")));
        assert!(!matches(&ended(None, Some("u1")), "s1", None));
    }

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(stream_id_less("0-0", "1700000000000-0"));
        assert!(stream_id_less("1700000000000-1", "1700000000000-2"));
        assert!(stream_id_less("999-9", "1000-0"));
        assert!(!stream_id_less("1000-0", "999-9"));
        assert!(!stream_id_less("5-5", "5-5"));
    }

    #[tokio::test]
    async fn in_memory_subscribers_hear_it_and_late_ones_are_told_from_memory() {
        let fanout = Fanout::memory();
        let mut early = fanout.subscribe();
        fanout.publish(ended(Some("s1"), None)).await;
        let heard = early.recv().await.unwrap();
        assert_eq!(heard.session, ended(Some("s1"), None));
        assert!(
            heard.at_ms.abs_diff(epoch_ms()) < 5_000,
            "stamped with when it happened"
        );
        assert!(fanout.recently_ended("s1"));
        assert!(!fanout.recently_ended("s2"));
        fanout.publish(ended(None, Some("u1"))).await;
        assert!(
            !fanout.recently_ended("s3"),
            "a logout naming only the person is not held against their later sessions"
        );
    }
}
