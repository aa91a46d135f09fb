//! The audit log: one JSON object a line in `<data_dir>/audit.jsonl`, each carrying the SHA-256 of the
//! line before it (`prev`; 64 zeros for the first), so that editing or deleting any line breaks the
//! chain. A small head file beside it (`audit.jsonl.head`: line count and last hash) makes truncation at
//! the end detectable too; with a seal key (from the keychain) the head carries an HMAC, so a head
//! rewritten to match a cut log, or a deleted one, is found as well.
//!
//! Group commit: [`AuditLog::record`] returns once the batch holding its record is in the file (one
//! `write` per batch, and with `sync` one `fdatasync`), so an answer that waits for it — a token — is
//! never sent before its record is written. Never a token in the log.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use zeroize::Zeroizing;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub pid: Option<i32>,
}

/// One thing that happened, before it is chained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub client: ClientInfo,
    pub method: String,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub uid: Option<String>,
    pub role_id: Option<String>,
    /// `ok`, `denied`, or `error <code>`.
    pub outcome: String,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client: &'a ClientInfo,
    method: &'a str,
    audience: &'a Option<String>,
    scope: &'a Option<String>,
    uid: &'a Option<String>,
    role_id: &'a Option<String>,
    outcome: &'a str,
    prev: &'a str,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Head {
    lines: u64,
    last: String,
    /// HMAC-SHA-256 of `lines` and `last` under the seal key, hex; absent without a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<String>,
}

/// The key that seals the head file: 32 bytes kept outside the data folder (the keychain), so that
/// whoever can edit the folder cannot write a head that verifies.
#[derive(Clone)]
pub struct SealKey(Zeroizing<[u8; 32]>);

impl SealKey {
    pub fn new(bytes: Zeroizing<[u8; 32]>) -> SealKey {
        SealKey(bytes)
    }

    /// A seal key derived from another secret (the store's data key): the same secret gives the same
    /// key, and the seal key reveals nothing of it.
    pub fn derived_from(secret: &[u8]) -> SealKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(b"cis2-agent audit seal key v1");
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        SealKey(key)
    }

    fn mac(&self, lines: u64, last: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0[..]).expect("any key length");
        mac.update(format!("cis2-agent audit head v1\n{lines}\n{last}").as_bytes());
        mac
    }

    fn seal(&self, lines: u64, last: &str) -> String {
        hex::encode(self.mac(lines, last).finalize().into_bytes())
    }

    /// An HMAC tag of `data` for another file of the data folder (`purpose` keeps the uses apart).
    pub(crate) fn tag(&self, purpose: &str, data: &[u8]) -> String {
        hex::encode(self.tag_mac(purpose, data).finalize().into_bytes())
    }

    /// Whether `tag` is [`tag`](Self::tag)'s for this `data`, compared in constant time.
    pub(crate) fn verifies_tag(&self, purpose: &str, data: &[u8], tag: &str) -> bool {
        hex::decode(tag).is_ok_and(|tag| self.tag_mac(purpose, data).verify_slice(&tag).is_ok())
    }

    fn tag_mac(&self, purpose: &str, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0[..]).expect("any key length");
        mac.update(format!("cis2-agent {purpose} v1\n").as_bytes());
        mac.update(data);
        mac
    }

    /// Compares in constant time.
    fn verifies(&self, lines: u64, last: &str, seal: &str) -> bool {
        hex::decode(seal).is_ok_and(|seal| self.mac(lines, last).verify_slice(&seal).is_ok())
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([redacted])")
    }
}

/// How the log is written.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// `fdatasync` each batch before its requests are answered (`[agent] audit_sync`): the records
    /// survive a power cut, not only a crash of the agent.
    pub sync: bool,
    /// Seals the head file; `None` leaves it unsealed (no keychain).
    pub seal_key: Option<SealKey>,
}

fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The record could not be written; the request it belongs to must not be answered as done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("the audit log could not be written: {0}")]
    Write(String),
    #[error("the audit log's writer has stopped")]
    Stopped,
}

/// The writer's handle. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    path: PathBuf,
}

struct Shared {
    state: Mutex<State>,
    /// How many records are in the file (advanced after each batch's write); waiters watch it.
    written: watch::Sender<u64>,
    file: std::fs::File,
    sync: bool,
    seal_key: Option<SealKey>,
    head: PathBuf,
}

/// The chain and what is still to be written, under one lock.
struct State {
    /// The lines appended but not yet written, in chain order.
    pending: Vec<u8>,
    /// The chain through the last appended record (written or not).
    appended: Chain,
    /// The chain through the last written record.
    written: Chain,
    /// Someone is writing a batch now; others wait for it, then one of them writes the next.
    writing: bool,
    /// A write failed: the file and the chain in memory may differ, so nothing more is recorded (and
    /// nothing more handed out) until the agent restarts and checks the log.
    failed: Option<String>,
    /// What the head file says.
    head_lines: u64,
    /// How far the log was written when the head's thread last looked (see [`Shared::keep_up`]).
    written_at_last_look: u64,
}

impl State {
    /// For the head's thread, at each look: the line to write through when records are pending and
    /// no request has written since its last look (their writers gave up); `None` otherwise.
    fn forgotten_records(&mut self) -> Option<u64> {
        let idle = self.written.lines == self.written_at_last_look;
        self.written_at_last_look = self.written.lines;
        (idle && self.appended.lines > self.written.lines).then_some(self.appended.lines)
    }
}

#[derive(Clone)]
struct Chain {
    lines: u64,
    last: String,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing its chain. A log whose chain is already broken
    /// (or whose sealed head does not match it) is not appended to: it is set aside as
    /// `audit.jsonl.broken-<time>` and a new chain begins, so the evidence is kept and new records stay
    /// verifiable. The head is written at once, so that from now on a missing head means tampering.
    pub fn open(path: &Path, options: AuditOptions) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut chain = Chain {
            lines: 0,
            last: GENESIS.to_string(),
        };
        if path.exists() {
            match verify(path, options.seal_key.as_ref()) {
                Ok(summary) => {
                    chain = Chain {
                        lines: summary.lines,
                        last: summary.last,
                    };
                }
                Err(problem) => {
                    let aside = path.with_extension(format!(
                        "jsonl.broken-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0)
                    ));
                    tracing::error!(%problem, aside = %aside.display(), "the audit log's chain is broken; set aside, starting a new chain");
                    std::fs::rename(path, &aside)?;
                    let head = head_path(path);
                    if head.exists() {
                        std::fs::rename(&head, head_path(&aside))?;
                    }
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        let (written, _) = watch::channel(chain.lines);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::with_capacity(64 * 1024),
                appended: chain.clone(),
                written: chain.clone(),
                writing: false,
                failed: None,
                head_lines: chain.lines,
                written_at_last_look: chain.lines,
            }),
            written,
            file,
            sync: options.sync,
            seal_key: options.seal_key,
            head: head_path(path),
        });
        shared.write_head(&chain)?;
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("cis2-audit-head".into())
            .spawn(move || keep_head(weak))?;
        Ok(AuditLog {
            shared,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record and returns once it is in the file (and, with `sync`, on the disk): group
    /// commit. Whoever finds no write under way writes everything appended so far with one `write`,
    /// on its own thread, and wakes the others; records that arrive meanwhile go out as the next
    /// batch. No thread hand-over on the way, which keeps a `token` answer's latency low.
    pub async fn record(&self, record: Record) -> Result<(), AuditError> {
        let mut written = self.shared.written.subscribe();
        let mine = self.shared.append(&record)?;
        loop {
            if self.shared.write_batch_unless_busy(mine)? {
                return Ok(());
            }
            if written.changed().await.is_err() {
                return Err(AuditError::Stopped);
            }
        }
    }

    /// Waits until everything appended so far is written and the head names it (tests, shutdown).
    pub async fn flush(&self) {
        let through = self.shared.lock().appended.lines;
        let mut written = self.shared.written.subscribe();
        while let Ok(false) = self.shared.write_batch_unless_busy(through) {
            if written.changed().await.is_err() {
                return;
            }
        }
        self.shared.update_head();
    }
}

/// How often the head file is brought up to date (it may lag the log by this much; it never runs
/// ahead of it); records whose writer gave up waiting are written within two of these.
const HEAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chains the record onto the log and queues its line; its number in the log.
    fn append(&self, record: &Record) -> Result<u64, AuditError> {
        let mut state = self.lock();
        if let Some(failed) = &state.failed {
            return Err(AuditError::Write(failed.clone()));
        }
        let text =
            chained(record, &state.appended.last).map_err(|e| AuditError::Write(e.to_string()))?;
        state.pending.extend_from_slice(text.as_bytes());
        state.pending.push(b'\n');
        state.appended.last = sha256_hex(text.as_bytes());
        state.appended.lines += 1;
        Ok(state.appended.lines)
    }

    /// `Ok(true)` once line `through` is written. Otherwise, unless another write is under way,
    /// writes the pending batch (one `write`, and an `fdatasync` with `sync`) and tells the waiters.
    fn write_batch_unless_busy(&self, through: u64) -> Result<bool, AuditError> {
        let (batch, chain) = {
            let mut state = self.lock();
            if let Some(failed) = &state.failed {
                return Err(AuditError::Write(failed.clone()));
            }
            if state.written.lines >= through {
                return Ok(true);
            }
            if state.writing {
                return Ok(false);
            }
            state.writing = true;
            (std::mem::take(&mut state.pending), state.appended.clone())
        };
        let result = (&self.file).write_all(&batch).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        let mut state = self.lock();
        state.writing = false;
        // The buffer goes back for the next batch, so a busy log does not allocate per batch.
        if state.pending.is_empty() {
            state.pending = batch;
            state.pending.clear();
        }
        let outcome = match result {
            Ok(()) => {
                state.written = chain;
                Ok(state.written.lines >= through)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit log; no more records (nor tokens) until the agent restarts");
                state.failed = Some(e.to_string());
                Err(AuditError::Write(e.to_string()))
            }
        };
        let written = state.written.lines;
        drop(state);
        self.written.send_replace(written);
        outcome
    }

    /// Writes everything appended, then rewrites the head if the log has grown since.
    fn update_head(&self) {
        let through = self.lock().appended.lines;
        let _ = self.write_batch_unless_busy(through);
        self.write_head_if_behind();
    }

    /// The head's thread, every [`HEAD_INTERVAL`]: writes records whose writer gave up waiting, but
    /// only when no request has written since its last look. While requests are coming, the next one
    /// writes them with its own batch; were this thread to write a batch then, the requests arriving
    /// meanwhile would wait for a thread the scheduler may not run for milliseconds (under load, a
    /// stall at each look).
    fn keep_up(&self) {
        let forgotten = self.lock().forgotten_records();
        if let Some(through) = forgotten {
            let _ = self.write_batch_unless_busy(through);
        }
        self.write_head_if_behind();
    }

    fn write_head_if_behind(&self) {
        let chain = {
            let state = self.lock();
            (state.written.lines != state.head_lines).then(|| state.written.clone())
        };
        if let Some(chain) = chain {
            match self.write_head(&chain) {
                Ok(()) => self.lock().head_lines = chain.lines,
                Err(e) => tracing::error!(error = %e, "cannot write the audit log's head"),
            }
        }
    }

    fn write_head(&self, chain: &Chain) -> io::Result<()> {
        let head = Head {
            lines: chain.lines,
            last: chain.last.clone(),
            seal: self
                .seal_key
                .as_ref()
                .map(|key| key.seal(chain.lines, &chain.last)),
        };
        let tmp = self.head.with_extension("head.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&head).map_err(io::Error::other)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(tmp, &self.head)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.update_head();
    }
}

/// The head's own thread: every [`HEAD_INTERVAL`], off the requests' path, while the log is open.
fn keep_head(log: std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(HEAD_INTERVAL);
        match log.upgrade() {
            Some(log) => log.keep_up(),
            None => return,
        }
    }
}

/// The record as its line (without the newline), chained to `prev`.
fn chained(record: &Record, prev: &str) -> Result<String, serde_json::Error> {
    serde_json::to_string(&Line {
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        client: &record.client,
        method: &record.method,
        audience: &record.audience,
        scope: &record.scope,
        uid: &record.uid,
        role_id: &record.role_id,
        outcome: &record.outcome,
        prev,
    })
}

/// An intact chain: how many lines, and the hash of the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub lines: u64,
    pub last: String,
}

/// Where the chain breaks, and why (`line` 0: the file itself could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {why}", path.display(), if *line > 0 { format!(": line {line}") } else { String::new() })]
pub struct Broken {
    pub path: PathBuf,
    /// 1-based; for a truncated log, the first missing line.
    pub line: u64,
    pub why: String,
}

/// Checks the whole chain, and the head file. With `seal_key` the head must be there and sealed by
/// it: a missing head, or one rewritten without the key, is reported; without a key a head is
/// checked when there is one.
pub fn verify(path: &Path, seal_key: Option<&SealKey>) -> Result<Intact, Broken> {
    let broken = |line: u64, why: String| Broken {
        path: path.to_path_buf(),
        line,
        why,
    };
    let file =
        std::fs::File::open(path).map_err(|e| broken(0, format!("cannot read the log: {e}")))?;
    let mut expected_prev = GENESIS.to_string();
    let mut count = 0u64;
    for (index, line) in io::BufReader::new(file).split(b'\n').enumerate() {
        let number = index as u64 + 1;
        let line = line.map_err(|e| broken(number, format!("cannot read: {e}")))?;
        let value: serde_json::Value = serde_json::from_slice(&line).map_err(|_| {
            broken(
                number,
                "the line is not a JSON record (edited or damaged)".into(),
            )
        })?;
        let prev = value
            .get("prev")
            .and_then(|p| p.as_str())
            .unwrap_or_default();
        if prev != expected_prev {
            return Err(broken(
                number,
                "its prev does not match the line before it: a line was edited, deleted or inserted here".into(),
            ));
        }
        expected_prev = sha256_hex(&line);
        count = number;
    }
    let head = match std::fs::read(head_path(path)) {
        Ok(text) => Some(
            serde_json::from_slice::<Head>(&text)
                .map_err(|_| broken(count, "the head file is damaged".into()))?,
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(broken(count, format!("cannot read the head file: {e}"))),
    };
    match (head, seal_key) {
        (None, Some(_)) => {
            return Err(broken(
                count,
                "the head file is missing: the agent writes it when it opens the log, so it was \
                 deleted, and the end of the log may have been cut off with it"
                    .into(),
            ));
        }
        (None, None) => {}
        (Some(head), key) => {
            if let Some(key) = key {
                let sealed = head
                    .seal
                    .as_deref()
                    .is_some_and(|seal| key.verifies(head.lines, &head.last, seal));
                if !sealed {
                    return Err(broken(
                        count,
                        "the head file's seal does not verify: it was written by something other \
                         than this agent (or the keychain's key changed), so the log's end cannot \
                         be trusted"
                            .into(),
                    ));
                }
            }
            if head.lines > count {
                return Err(broken(
                    count + 1,
                    format!(
                        "the log ends after {count} lines but {} were written: it was truncated",
                        head.lines
                    ),
                ));
            }
            if head.lines == count && head.last != expected_prev {
                return Err(broken(
                    count,
                    "the last line differs from the one written".into(),
                ));
            }
        }
    }
    Ok(Intact {
        lines: count,
        last: expected_prev,
    })
}

/// The last `n` lines, as written.
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let file = std::fs::File::open(path)?;
    let mut last = std::collections::VecDeque::with_capacity(n + 1);
    for line in io::BufReader::new(file).lines() {
        last.push_back(line?);
        if last.len() > n {
            last.pop_front();
        }
    }
    Ok(last.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn append(log: &AuditLog, method: &str) {
        log.record(Record {
            method: method.into(),
            outcome: "ok".into(),
            ..Record::default()
        })
        .await
        .unwrap();
    }

    async fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        sealed_log_with(n, None).await
    }

    fn key(byte: u8) -> SealKey {
        SealKey::new(Zeroizing::new([byte; 32]))
    }

    async fn sealed_log_with(n: usize, seal_key: Option<SealKey>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(
            &path,
            AuditOptions {
                sync: true,
                seal_key,
            },
        )
        .unwrap();
        for i in 0..n {
            log.record(Record {
                method: "token".into(),
                uid: Some("555021935107".into()),
                outcome: if i % 2 == 0 {
                    "ok".into()
                } else {
                    "denied".into()
                },
                ..Record::default()
            })
            .await
            .unwrap();
        }
        log.flush().await;
        (dir, path)
    }

    fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let mut lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        f(&mut lines);
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn the_heads_thread_writes_pending_records_only_when_no_request_wrote_since_its_last_look() {
        let chain = |lines| Chain {
            lines,
            last: GENESIS.to_string(),
        };
        let mut state = State {
            pending: b"{}\n".to_vec(),
            appended: chain(3),
            written: chain(2),
            writing: false,
            failed: None,
            head_lines: 2,
            written_at_last_look: 1,
        };
        // A request wrote since the last look: the next request's batch takes the pending record.
        assert_eq!(state.forgotten_records(), None);
        // Nobody wrote since: its writer gave up, the thread writes it.
        assert_eq!(state.forgotten_records(), Some(3));
        // Nothing pending: nothing to write, however idle.
        state.written = chain(3);
        assert_eq!(state.forgotten_records(), None);
        assert_eq!(state.forgotten_records(), None);
    }

    #[tokio::test]
    async fn an_intact_chain_verifies_and_reopening_continues_it() {
        let (_dir, path) = log_with(5).await;
        assert_eq!(verify(&path, None).unwrap().lines, 5);
        let first: serde_json::Value = serde_json::from_str(&tail(&path, 5).unwrap()[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        let log = AuditLog::open(&path, AuditOptions::default()).unwrap();
        append(&log, "whoami").await;
        log.flush().await;
        assert_eq!(verify(&path, None).unwrap().lines, 6);
    }

    #[tokio::test]
    async fn an_edit_is_found_at_the_line_after_it() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| {
            assert!(lines[1].contains("\"denied\""));
            lines[1] = lines[1].replace("\"denied\"", "\"ok\"");
        });
        assert_eq!(verify(&path, None).unwrap_err().line, 3);
    }

    #[tokio::test]
    async fn a_deletion_is_found() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| {
            lines.remove(1);
        });
        assert_eq!(verify(&path, None).unwrap_err().line, 2);
    }

    #[tokio::test]
    async fn truncation_at_the_end_is_found() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| lines.truncate(3));
        let err = verify(&path, None).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.why.contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn an_edited_last_line_is_found() {
        let (_dir, path) = log_with(3).await;
        rewrite(&path, |lines| {
            lines[2] = lines[2].replace("\"token\"", "\"whoami\"")
        });
        assert_eq!(verify(&path, None).unwrap_err().line, 3);
    }

    #[tokio::test]
    async fn a_broken_log_is_set_aside_not_appended_to() {
        let (dir, path) = log_with(3).await;
        rewrite(&path, |lines| {
            lines.remove(0);
        });
        let log = AuditLog::open(&path, AuditOptions::default()).unwrap();
        append(&log, "token").await;
        log.flush().await;
        assert_eq!(verify(&path, None).unwrap().lines, 1);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("broken"))
            .collect::<Vec<_>>();
        // The broken log, and its head beside it: both kept as evidence.
        assert_eq!(aside.len(), 2, "{aside:?}");
        assert!(
            aside.iter().any(|name| name.ends_with(".head")),
            "{aside:?}"
        );
    }

    #[tokio::test]
    async fn a_record_is_in_the_file_when_record_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, AuditOptions::default()).unwrap();
        for i in 1..=50u64 {
            append(&log, "token").await;
            // Read at once, without flush: group commit answered only after the write.
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text.lines().count() as u64, i);
        }
    }

    #[tokio::test]
    async fn with_a_seal_a_cut_log_whose_head_was_deleted_or_rewritten_is_found() {
        let (_dir, path) = sealed_log_with(5, Some(key(7))).await;
        assert_eq!(verify(&path, Some(&key(7))).unwrap().lines, 5);
        let head = head_path(&path);
        let sealed_head = std::fs::read(&head).unwrap();
        rewrite(&path, |lines| lines.truncate(3));

        // The head deleted with the cut: what issue 20 found said "intact" before the seal.
        std::fs::remove_file(&head).unwrap();
        assert!(
            verify(&path, None).is_ok(),
            "unsealed, a deleted head is not noticed"
        );
        let err = verify(&path, Some(&key(7))).unwrap_err();
        assert!(err.why.contains("head file is missing"), "{err}");

        // A head recomputed for the cut log, without the key.
        let intact = verify(&path, None).unwrap();
        let forged = Head {
            lines: intact.lines,
            last: intact.last.clone(),
            seal: None,
        };
        std::fs::write(&head, serde_json::to_vec(&forged).unwrap()).unwrap();
        let err = verify(&path, Some(&key(7))).unwrap_err();
        assert!(err.why.contains("seal does not verify"), "{err}");
        let forged = Head {
            seal: Some(key(8).seal(intact.lines, &intact.last)),
            ..forged
        };
        std::fs::write(&head, serde_json::to_vec(&forged).unwrap()).unwrap();
        assert!(
            verify(&path, Some(&key(7))).is_err(),
            "sealed with another key"
        );

        // The genuine head back: the cut is named as before.
        std::fs::write(&head, &sealed_head).unwrap();
        let err = verify(&path, Some(&key(7))).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.why.contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn a_sealed_log_reopens_and_continues_and_its_head_is_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = AuditOptions {
            sync: false,
            seal_key: Some(key(1)),
        };
        let log = AuditLog::open(&path, options.clone()).unwrap();
        // Before any record the head is there, so that its absence later means it was removed.
        assert_eq!(verify(&path, Some(&key(1))).unwrap().lines, 0);
        log.record(Record::default()).await.unwrap();
        log.flush().await;
        drop(log);
        let log = AuditLog::open(&path, options).unwrap();
        log.record(Record::default()).await.unwrap();
        log.flush().await;
        assert_eq!(verify(&path, Some(&key(1))).unwrap().lines, 2);
    }
}
