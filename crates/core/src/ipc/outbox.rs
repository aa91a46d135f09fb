//! A connection's way out: answers and events are written straight to the client when nothing is
//! queued ahead of them and the socket takes them at once — the common case, an answer leaves from
//! the task that computed it, with no hop to another task — and queued otherwise, for a writer task
//! to send in order as the client reads. The queue is bounded in lines and in bytes: a client that
//! stops reading its answers is found out (and disconnected) rather than holding the agent's memory.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// What became of a line handed to [`Outbox::try_queue`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Queued {
    /// Written, or queued behind what is being written.
    Yes,
    /// The queue is full: the client is not reading.
    NoRoom,
    /// The connection's writing has ended.
    Closed,
}

type Out = Pin<Box<dyn AsyncWrite + Send>>;

struct Shared {
    /// The client's end, and what is waiting for it. A std mutex: nothing waits while holding it
    /// (writes are polled, never awaited, under it).
    sink: Mutex<Sink>,
    max_lines: usize,
    max_bytes: usize,
    /// Told when a queued line has been written (room for a promised resync).
    room: Notify,
    /// Told when the client stopped reading its answers: the connection is to close.
    stalled: Notify,
    /// Outboxes alive; when the last is gone, the writer sends what is queued and ends.
    senders: AtomicUsize,
}

struct Sink {
    out: Out,
    /// Lines not yet (fully) written; the front one has `written` of its bytes out already.
    queue: VecDeque<String>,
    written: usize,
    queued_bytes: usize,
    /// No more lines are taken: the agent stops, or every outbox is gone.
    closing: bool,
    /// Writing failed or ended: lines are refused.
    closed: bool,
    writer: Option<Waker>,
}

impl Sink {
    /// Writes queued lines until the socket would block. `Ready(Ok)` when the queue is empty.
    fn flush_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(front) = self.queue.front() {
            let rest = &front.as_bytes()[self.written..];
            match self.out.as_mut().poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) if n < rest.len() => self.written += n,
                Poll::Ready(Ok(_)) => {
                    self.written = 0;
                    let line = self.queue.pop_front().unwrap_or_default();
                    self.queued_bytes -= line.len();
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A connection's way out; cloned for every task that answers on it.
pub(super) struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's end of an [`Outbox`]: run it as a task of its own.
pub(super) struct Writer {
    shared: Arc<Shared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut sink = self.shared.lock();
            sink.closing = true;
            if let Some(writer) = sink.writer.take() {
                writer.wake();
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Outbox {
    pub(super) fn new(
        out: impl AsyncWrite + Send + 'static,
        max_lines: usize,
        max_bytes: usize,
    ) -> (Outbox, Writer) {
        let shared = Arc::new(Shared {
            sink: Mutex::new(Sink {
                out: Box::pin(out),
                queue: VecDeque::new(),
                written: 0,
                queued_bytes: 0,
                closing: false,
                closed: false,
                writer: None,
            }),
            max_lines,
            max_bytes,
            room: Notify::new(),
            stalled: Notify::new(),
            senders: AtomicUsize::new(1),
        });
        (
            Outbox {
                shared: shared.clone(),
            },
            Writer { shared },
        )
    }

    /// Sends `line` (with its newline) now if nothing is queued and the client's socket takes it, else
    /// queues it if it fits in both bounds; never waits.
    pub(super) fn try_queue(&self, line: String) -> Queued {
        let mut sink = self.shared.lock();
        if sink.closed || sink.closing {
            return Queued::Closed;
        }
        let mut written = 0;
        if sink.queue.is_empty() {
            // Polled with a waker that does nothing: when the socket is full the writer task polls
            // again with its own, which the runtime then keeps (the last poll's waker is the one woken).
            let mut cx = Context::from_waker(Waker::noop());
            while written < line.len() {
                match sink
                    .out
                    .as_mut()
                    .poll_write(&mut cx, &line.as_bytes()[written..])
                {
                    Poll::Ready(Ok(n)) if n > 0 => written += n,
                    Poll::Ready(Ok(_) | Err(_)) => {
                        // The writer meets the same error on its next write and ends the connection.
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if written == line.len() {
                return Queued::Yes;
            }
        } else if sink.queue.len() >= self.shared.max_lines
            || sink.queued_bytes + line.len() > self.shared.max_bytes
        {
            return Queued::NoRoom;
        }
        // Part of a line that went out must follow, whatever the bounds: the stream stays whole.
        if sink.queue.is_empty() {
            sink.written = written;
        }
        sink.queued_bytes += line.len();
        sink.queue.push_back(line);
        if let Some(writer) = sink.writer.take() {
            writer.wake();
        }
        Queued::Yes
    }

    /// Sends or queues an answer. A client with no room left has stopped reading: the connection
    /// closes.
    pub(super) fn answer(&self, line: String) -> bool {
        match self.try_queue(line) {
            Queued::Yes => true,
            Queued::NoRoom => {
                self.shared.stalled.notify_one();
                false
            }
            Queued::Closed => false,
        }
    }

    /// Resolves when a queued line has been written.
    pub(super) async fn room(&self) {
        self.shared.room.notified().await;
    }

    /// Resolves when the client has stopped reading its answers.
    pub(super) async fn stalled(&self) {
        self.shared.stalled.notified().await;
    }

    /// Takes no more lines; the writer sends what is queued, then ends.
    pub(super) fn finish(&self) {
        let mut sink = self.shared.lock();
        sink.closing = true;
        if let Some(writer) = sink.writer.take() {
            writer.wake();
        }
    }
}

impl Writer {
    /// Writes what is queued as the client reads it, until the outboxes are gone (or [`Outbox::finish`])
    /// and the queue is empty, or writing fails; then shuts the client's end.
    pub(super) async fn run(self) {
        let result = std::future::poll_fn(|cx| {
            let mut sink = self.shared.lock();
            let before = sink.queue.len();
            let flushed = sink.flush_queue(cx);
            if sink.queue.len() < before {
                self.shared.room.notify_one();
            }
            match flushed {
                Poll::Ready(Ok(())) if sink.closing => Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    sink.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                // The socket has our waker; a new line must wake us too (it may find the queue empty
                // and write directly, which is fine).
                Poll::Pending => {
                    sink.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        let mut out = {
            let mut sink = self.shared.lock();
            sink.closed = true;
            sink.queue.clear();
            let done: Out = Box::pin(tokio::io::sink());
            std::mem::replace(&mut sink.out, done)
        };
        if result.is_ok() {
            let _ = out.shutdown().await;
        }
    }
}
