//! Windows: the agent is a named pipe (`\\.\pipe\cis2-agent-<user SID>`). The client opens it with
//! identification-only impersonation (the server cannot act as this user), then checks that the process
//! serving it runs as this user: a pipe created by another user's program is refused before anything is
//! sent. Reads have timeouts through a small tokio runtime owned by the client.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeClient};

/// `ERROR_PIPE_BUSY`: every instance is taken for a moment.
const ERROR_PIPE_BUSY: i32 = 231;
/// `SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION`.
const IDENTIFICATION_ONLY: u32 = 0x0010_0000 | (1 << 16);

/// `\\.\pipe\cis2-agent-<SID of this user>`.
pub fn default_pipe_name() -> PathBuf {
    let user = cis2_os::current_user_sid()
        .unwrap_or_else(|_| std::env::var("USERNAME").unwrap_or_else(|_| "unknown-user".into()));
    PathBuf::from(format!(r"\\.\pipe\cis2-agent-{user}"))
}

pub struct Reader {
    runtime: Arc<tokio::runtime::Runtime>,
    half: BufReader<ReadHalf<NamedPipeClient>>,
    timeout: Option<Duration>,
    /// Set by a `Shutdown` from another thread: a pipe read cannot be interrupted otherwise.
    closed: Arc<tokio::sync::watch::Sender<bool>>,
}

pub struct Writer {
    runtime: Arc<tokio::runtime::Runtime>,
    half: WriteHalf<NamedPipeClient>,
}

/// Opens the pipe and checks its server is this user's; `Err(Some(why))` when the server is not.
pub fn connect(path: &Path) -> Result<(Reader, Writer), (io::Error, bool)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (e, false))?;
    let runtime = Arc::new(runtime);
    let pipe = runtime
        .block_on(async {
            let mut tries = 0;
            loop {
                match ClientOptions::new()
                    .security_qos_flags(IDENTIFICATION_ONLY)
                    .open(path.as_os_str())
                {
                    Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) && tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        })
        .map_err(|e| (e, false))?;
    check_server(&pipe).map_err(|e| (e, true))?;
    let (read, write) = tokio::io::split(pipe);
    Ok((
        Reader {
            runtime: runtime.clone(),
            half: BufReader::new(read),
            timeout: None,
            closed: Arc::new(tokio::sync::watch::channel(false).0),
        },
        Writer {
            runtime,
            half: write,
        },
    ))
}

/// The process serving the pipe must run as this user.
fn check_server(pipe: &NamedPipeClient) -> io::Result<()> {
    let pid = cis2_os::pipe_server_pid(pipe)?;
    let theirs = cis2_os::Process::open(pid)?.user_sid()?;
    let mine = cis2_os::current_user_sid()?;
    if theirs != mine {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the pipe is served by process {pid} of another user ({theirs}), not by this user's agent"
            ),
        ));
    }
    Ok(())
}

impl Reader {
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    pub fn closer(&self) -> Arc<tokio::sync::watch::Sender<bool>> {
        self.closed.clone()
    }

    /// Like `BufRead::read_line`, with the timeout; ends at once when the connection is shut down.
    pub fn read_line(&mut self, line: &mut String) -> io::Result<usize> {
        let mut closed = self.closed.subscribe();
        let half = &mut self.half;
        // A line cut short by the shutdown is lost with the connection, which is what was asked for.
        let read = async move {
            tokio::select! {
                read = half.read_line(line) => read,
                _ = closed.wait_for(|closed| *closed) => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the connection was shut down by this program",
                )),
            }
        };
        match self.timeout {
            None => self.runtime.block_on(read),
            Some(timeout) => self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, read).await })
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the agent did not answer in time",
                    ))
                }),
        }
    }
}

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.runtime.block_on(self.half.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.runtime.block_on(self.half.flush())
    }
}
