//! The private line protocol between the long-lived app (agent and tray) and its window process,
//! over the window process's stdin and stdout: the window's calls go up, answers, views and "come to
//! the front" come down. Only the process the app started holds those pipes, so no other program can
//! answer an approval prompt through it. Not part of the public contract (that is the agent's socket).

use cis2_core::desktop::Desktop;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// What the window asks of the agent: one variant per button, each one call into `core::desktop`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    View,
    Login,
    CancelLogin,
    ChangeRole,
    Logout,
    AnswerApproval {
        id: u64,
        answer: String,
    },
    RememberedPrograms,
    ForgetProgram {
        id: String,
    },
    /// The window has painted its first view (the app logs how long opening took).
    Drawn,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// Matches the reply to the call (the calls' own fields may be named `id`).
    seq: u64,
    #[serde(flatten)]
    call: Call,
}

/// What the app sends the window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToWindow {
    Reply {
        seq: u64,
        result: Result<Value, String>,
    },
    /// The view changed (the window redraws from it).
    View { view: Value },
    /// A second launch, Open in the tray, or a prompt: the window comes to the front.
    Focus,
}

fn json<T: Serialize>(value: T) -> Result<Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// Carries out one call of the window.
pub async fn answer(desktop: &Desktop, call: Call) -> Result<Value, String> {
    match call {
        Call::View => json(desktop.view()),
        Call::Login => json(desktop.login().await?),
        Call::CancelLogin => json(desktop.cancel_login()),
        Call::ChangeRole => json(desktop.change_role().await?),
        Call::Logout => json(desktop.logout().await?),
        Call::AnswerApproval { id, answer } => json(desktop.answer_approval(id, &answer)?),
        Call::RememberedPrograms => json(desktop.remembered_programs()),
        Call::ForgetProgram { id } => json(desktop.forget_program(&id)?),
        Call::Drawn => Ok(Value::Null),
    }
}

/// Writes each message as one JSON line until the channel closes or the pipe breaks.
async fn write_lines<T: Serialize>(
    mut to: impl AsyncWrite + Unpin,
    mut messages: mpsc::UnboundedReceiver<T>,
) {
    while let Some(message) = messages.recv().await {
        let Ok(mut line) = serde_json::to_vec(&message) else {
            continue;
        };
        line.push(b'\n');
        if to.write_all(&line).await.is_err() || to.flush().await.is_err() {
            return;
        }
    }
}

/// The app's side: answers the window's calls with `desktop` until the window process ends, and
/// passes on what arrives on `outbox`. `on_drawn` runs when the window reports its first paint.
pub async fn serve_window(
    desktop: Desktop,
    from_window: impl AsyncRead + Unpin,
    to_window: impl AsyncWrite + Unpin + Send + 'static,
    outbox: mpsc::UnboundedSender<ToWindow>,
    outgoing: mpsc::UnboundedReceiver<ToWindow>,
    on_drawn: impl Fn() + Send + 'static,
) {
    let writer = tokio::spawn(write_lines(to_window, outgoing));
    let mut lines = BufReader::new(from_window).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request = match serde_json::from_str::<Request>(&line) {
            Ok(request) => request,
            // WebKit or GTK may print to stdout; that is not ours to answer.
            Err(_) => {
                tracing::debug!(line = %line.chars().take(200).collect::<String>(), "window process printed a line that is not a call");
                continue;
            }
        };
        if request.call == Call::Drawn {
            on_drawn();
        }
        let (desktop, outbox) = (desktop.clone(), outbox.clone());
        tokio::spawn(async move {
            let result = answer(&desktop, request.call).await;
            let _ = outbox.send(ToWindow::Reply {
                seq: request.seq,
                result,
            });
        });
    }
    writer.abort();
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// The window's side: calls the app and hears its views.
pub struct Link {
    next_id: AtomicU64,
    waiting: Waiting,
    outgoing: mpsc::UnboundedSender<Request>,
}

/// What the window does with what the app sends other than answers.
pub struct Handlers {
    pub view: Box<dyn Fn(Value) + Send>,
    pub focus: Box<dyn Fn() + Send>,
    /// The app is gone (the pipe closed): the window has nothing to show.
    pub closed: Box<dyn FnOnce() + Send>,
}

impl Link {
    /// Connects over `from_app`/`to_app`; must be called inside a Tokio runtime.
    pub fn connect(
        from_app: impl AsyncRead + Unpin + Send + 'static,
        to_app: impl AsyncWrite + Unpin + Send + 'static,
        handlers: Handlers,
    ) -> Link {
        let (outgoing, requests) = mpsc::unbounded_channel();
        tokio::spawn(write_lines(to_app, requests));
        let waiting: Waiting = Arc::default();
        let answers = waiting.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(from_app).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ToWindow>(&line) {
                    Ok(ToWindow::Reply { seq, result }) => {
                        let waiter = answers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&seq);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(result);
                        }
                    }
                    Ok(ToWindow::View { view }) => (handlers.view)(view),
                    Ok(ToWindow::Focus) => (handlers.focus)(),
                    Err(e) => {
                        tracing::warn!(error = %e, "the app sent a line the window does not understand")
                    }
                }
            }
            // Every call still waiting learns the app is gone (their senders drop here).
            answers.lock().unwrap_or_else(|e| e.into_inner()).clear();
            (handlers.closed)();
        });
        Link {
            next_id: AtomicU64::new(1),
            waiting,
            outgoing,
        }
    }

    /// One call to the app, and its answer.
    pub async fn call(&self, call: Call) -> Result<Value, String> {
        let seq = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, tx);
        let gone = || "The CIS2 Agent app is no longer running.".to_string();
        self.outgoing
            .send(Request { seq, call })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window's link over an in-memory pipe: the link, the app's end, and word of the app going.
    fn connected() -> (Link, tokio::io::DuplexStream, oneshot::Receiver<()>) {
        let (window_end, app_end) = tokio::io::duplex(4096);
        let (from_app, to_app) = tokio::io::split(window_end);
        let (closed, was_closed) = oneshot::channel();
        let handlers = Handlers {
            view: Box::new(|_| {}),
            focus: Box::new(|| {}),
            closed: Box::new(move || {
                let _ = closed.send(());
            }),
        };
        (
            Link::connect(from_app, to_app, handlers),
            app_end,
            was_closed,
        )
    }

    #[tokio::test]
    async fn a_reply_finds_its_call_past_lines_that_are_not_ours() {
        let (link, app_end, _) = connected();
        let (app_read, mut app_write) = tokio::io::split(app_end);
        let app = tokio::spawn(async move {
            let mut lines = BufReader::new(app_read).lines();
            let line = lines.next_line().await.unwrap().unwrap();
            app_write
                .write_all(b"Gtk-WARNING: not a message\n{\"kind\":\"reply\",\"seq\":99,\"result\":{\"Ok\":0}}\n{\"kind\":\"reply\",\"seq\":1,\"result\":{\"Err\":\"No remembered program has the id x.\"}}\n")
                .await
                .unwrap();
            (line, lines, app_write)
        });
        let answer = link.call(Call::ForgetProgram { id: "x".into() }).await;
        assert_eq!(
            answer,
            Err("No remembered program has the id x.".to_string())
        );
        let (line, _, _) = app.await.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            serde_json::json!({"seq": 1, "call": "forget_program", "id": "x"})
        );
    }

    #[tokio::test]
    async fn a_call_in_flight_when_the_app_goes_away_is_told_so() {
        let (link, app_end, was_closed) = connected();
        let app = tokio::spawn(async move {
            let (app_read, app_write) = tokio::io::split(app_end);
            let mut lines = BufReader::new(app_read).lines();
            lines.next_line().await.unwrap().unwrap();
            // Gone without answering.
            drop((lines, app_write));
        });
        let answer = link.call(Call::Logout).await;
        assert_eq!(
            answer,
            Err("The CIS2 Agent app is no longer running.".to_string())
        );
        app.await.unwrap();
        was_closed
            .await
            .expect("the window is told the app is gone");
    }
}
