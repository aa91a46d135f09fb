//! The audit log: one JSON object a line in `<data_dir>/audit.jsonl`, each carrying the SHA-256 of the
//! line before it (`prev`; 64 zeros for the first), so that editing or deleting any line breaks the
//! chain. A small head file beside it (`audit.jsonl.head`: line count and last hash) makes truncation at
//! the end detectable too. Records are written by one task in batches, so a request never waits on the
//! disk; no record is dropped (the queue applies back-pressure when full). Never a token.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

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
}

fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

enum Message {
    Record(Record),
    Flush(oneshot::Sender<()>),
}

/// The writer's handle. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing its chain. A log whose chain is already broken
    /// is not appended to: it is set aside as `audit.jsonl.broken-<time>` and a new chain begins, so the
    /// evidence is kept and new records stay verifiable.
    pub fn open(path: &Path) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (mut lines, mut last) = (0u64, GENESIS.to_string());
        if path.exists() {
            match verify(path) {
                Ok(summary) => {
                    lines = summary.lines;
                    last = summary.last;
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
                    let _ = std::fs::remove_file(head_path(path));
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
        let (tx, rx) = mpsc::channel(4096);
        let writer = Writer {
            file: io::BufWriter::new(file),
            head: head_path(path),
            lines,
            last,
            head_written_at: None,
            head_dirty: false,
        };
        std::thread::Builder::new()
            .name("cis2-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(AuditLog {
            tx,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; waits only when the queue is full.
    pub async fn record(&self, record: Record) {
        let _ = self.tx.send(Message::Record(record)).await;
    }

    /// Waits until everything queued so far is on disk (tests, shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// How often the head file is rewritten under load: a busy agent would otherwise rename a file per
/// request. The head may lag the log by this much; it never runs ahead of it.
const HEAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

struct Writer {
    file: io::BufWriter<std::fs::File>,
    head: PathBuf,
    lines: u64,
    last: String,
    head_written_at: Option<std::time::Instant>,
    head_dirty: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        loop {
            let first = match rx.try_recv() {
                Ok(message) => message,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if self.head_dirty => {
                    // Quiet: bring the head up to date once it is due.
                    self.sync_head(false);
                    if self.head_dirty {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    continue;
                }
                Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                    Some(message) => message,
                    None => break,
                },
            };
            let mut waiting = Vec::new();
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
                if batch.len() >= 1024 {
                    break;
                }
            }
            for message in batch {
                match message {
                    Message::Record(record) => {
                        if let Err(e) = self.append(&record) {
                            tracing::error!(error = %e, "cannot write the audit log");
                        }
                    }
                    Message::Flush(done) => waiting.push(done),
                }
            }
            if let Err(e) = self.file.flush() {
                tracing::error!(error = %e, "cannot write the audit log");
            }
            self.head_dirty = true;
            self.sync_head(!waiting.is_empty());
            for done in waiting {
                let _ = done.send(());
            }
        }
        self.sync_head(true);
    }

    fn sync_head(&mut self, now: bool) {
        let due = self
            .head_written_at
            .is_none_or(|at| at.elapsed() >= HEAD_INTERVAL);
        if self.head_dirty && (now || due) {
            match self.write_head() {
                Ok(()) => {
                    self.head_dirty = false;
                    self.head_written_at = Some(std::time::Instant::now());
                }
                Err(e) => tracing::error!(error = %e, "cannot write the audit log's head"),
            }
        }
    }

    fn append(&mut self, record: &Record) -> io::Result<()> {
        let line = Line {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            client: &record.client,
            method: &record.method,
            audience: &record.audience,
            scope: &record.scope,
            uid: &record.uid,
            role_id: &record.role_id,
            outcome: &record.outcome,
            prev: &self.last,
        };
        let text = serde_json::to_string(&line).map_err(io::Error::other)?;
        self.file.write_all(text.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.last = sha256_hex(text.as_bytes());
        self.lines += 1;
        Ok(())
    }

    fn write_head(&self) -> io::Result<()> {
        let head = Head {
            lines: self.lines,
            last: self.last.clone(),
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

/// Checks the whole chain, and the head file when there is one.
pub fn verify(path: &Path) -> Result<Intact, Broken> {
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
    if let Ok(text) = std::fs::read(head_path(path)) {
        let head: Head = serde_json::from_slice(&text)
            .map_err(|_| broken(count, "the head file is damaged".into()))?;
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

    async fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
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
            .await;
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

    #[tokio::test]
    async fn an_intact_chain_verifies_and_reopening_continues_it() {
        let (_dir, path) = log_with(5).await;
        assert_eq!(verify(&path).unwrap().lines, 5);
        let first: serde_json::Value = serde_json::from_str(&tail(&path, 5).unwrap()[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        let log = AuditLog::open(&path).unwrap();
        log.record(Record {
            method: "whoami".into(),
            outcome: "ok".into(),
            ..Record::default()
        })
        .await;
        log.flush().await;
        assert_eq!(verify(&path).unwrap().lines, 6);
    }

    #[tokio::test]
    async fn an_edit_is_found_at_the_line_after_it() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| {
            assert!(lines[1].contains("\"denied\""));
            lines[1] = lines[1].replace("\"denied\"", "\"ok\"");
        });
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[tokio::test]
    async fn a_deletion_is_found() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| {
            lines.remove(1);
        });
        assert_eq!(verify(&path).unwrap_err().line, 2);
    }

    #[tokio::test]
    async fn truncation_at_the_end_is_found() {
        let (_dir, path) = log_with(5).await;
        rewrite(&path, |lines| lines.truncate(3));
        let err = verify(&path).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.why.contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn an_edited_last_line_is_found() {
        let (_dir, path) = log_with(3).await;
        rewrite(&path, |lines| {
            lines[2] = lines[2].replace("\"token\"", "\"whoami\"")
        });
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[tokio::test]
    async fn a_broken_log_is_set_aside_not_appended_to() {
        let (dir, path) = log_with(3).await;
        rewrite(&path, |lines| {
            lines.remove(0);
        });
        let log = AuditLog::open(&path).unwrap();
        log.record(Record {
            method: "token".into(),
            outcome: "ok".into(),
            ..Record::default()
        })
        .await;
        log.flush().await;
        assert_eq!(verify(&path).unwrap().lines, 1);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("broken"))
            .count();
        assert_eq!(aside, 1);
    }
}
