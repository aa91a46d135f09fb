//! The loopback redirect (RFC 8252 §7.3, §8.3): a listener on 127.0.0.1 — never 0.0.0.0, never the name
//! `localhost` — on an ephemeral port or the first free one of a configured list. It accepts exactly
//! one callback whose `state` matches, answers the browser with a short page, and closes. Noise
//! (favicon, probes, a stale tab's callback) is answered and ignored; nothing is waited on forever.
//!
//! The sign-in is bound to the browser that starts it (against login CSRF and session swap: on a
//! shared computer every user can reach this port and read other users' command lines). The browser
//! is sent to a one-time start URL on this listener, which sets a cookie for the listener's origin
//! (HttpOnly, SameSite=Lax, Path=/) and redirects to the provider; the callback is accepted only with
//! that cookie. A second opening of the start URL cancels the sign-in for everyone, and a callback with
//! the right `state` but without the cookie ends it with an error: a race fails closed.

use crate::secret::Secret;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

pub const CALLBACK_PATH: &str = "/callback";
/// The start URL is `START_PATH` followed by a one-time random token.
pub const START_PATH: &str = "/start/";
const MAX_REQUEST_HEAD: usize = 16 * 1024;
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections read at once (a browser opens a few; anything more is noise).
const MAX_CONNECTIONS: usize = 8;

/// Why no code came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("cannot listen for the sign-in redirect on 127.0.0.1 ({0})")]
    Bind(String),
    #[error("the sign-in was not finished in the browser within {0} seconds; start it again")]
    TimedOut(u64),
    #[error("{sentence}")]
    Provider {
        /// The OAuth `error` code (e.g. `access_denied`).
        error: String,
        sentence: String,
    },
    #[error(
        "the sign-in answer came from another provider ({found}); it was refused to prevent a mix-up attack"
    )]
    WrongIssuer { found: String },
    #[error("the provider's answer had neither a code nor an error")]
    NoCode,
    #[error(
        "the sign-in's start address was opened twice (by another browser or another user), so the sign-in was cancelled to protect it; start it again"
    )]
    StartedTwice,
    #[error(
        "the sign-in answer did not come from the browser that started the sign-in (another user may have tried to take it over), so it was refused; start it again"
    )]
    NotThisBrowser,
}

/// A sentence a clinician understands for an OAuth `error` from the provider.
pub fn explain_provider_error(error: &str, description: Option<&str>) -> String {
    let base = match error {
        "access_denied" => "The sign-in was cancelled or refused at the Care Identity Service.",
        "login_required" | "interaction_required" => {
            "The Care Identity Service needs you to sign in again."
        }
        "consent_required" => "The Care Identity Service needs your consent for this application.",
        "invalid_scope" => {
            "The Care Identity Service refused what this application asked for (its scopes); tell your IT service desk."
        }
        "unauthorized_client" | "invalid_client" => {
            "The Care Identity Service does not recognise this application's registration; tell your IT service desk."
        }
        "temporarily_unavailable" | "server_error" => {
            "The Care Identity Service is having problems. Try again in a few minutes."
        }
        _ => "The Care Identity Service refused the sign-in.",
    };
    let detail: String = description
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if detail.is_empty() {
        format!("{base} (error: {error})")
    } else {
        format!("{base} (error: {error}: {detail})")
    }
}

/// A code that arrived, and when (the start of the agent's part of a sign-in).
#[derive(Debug)]
pub struct Callback {
    pub code: Secret,
    pub received_at: Instant,
}

pub struct LoopbackListener {
    listener: TcpListener,
    port: u16,
    /// The one-time path token of the start URL.
    start_token: String,
    /// The cookie value that binds the browser which opened the start URL.
    binding: String,
}

impl LoopbackListener {
    /// Binds 127.0.0.1: the first free port of `ports`, or an ephemeral port when the list is empty.
    pub async fn bind(ports: &[u16]) -> Result<LoopbackListener, CallbackError> {
        let candidates: Vec<u16> = if ports.is_empty() {
            vec![0]
        } else {
            ports.to_vec()
        };
        let mut last_error = String::new();
        for port in candidates {
            match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
                Ok(listener) => {
                    let port = listener
                        .local_addr()
                        .map_err(|e| CallbackError::Bind(e.to_string()))?
                        .port();
                    return Ok(LoopbackListener {
                        listener,
                        port,
                        start_token: cis2_jose::random_token(32),
                        binding: cis2_jose::random_token(32),
                    });
                }
                Err(e) => last_error = format!("port {port}: {e}"),
            }
        }
        Err(CallbackError::Bind(last_error))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}{CALLBACK_PATH}", self.port)
    }

    /// What to open in the browser: it sets the binding cookie and redirects to the authorize URL.
    pub fn start_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}{START_PATH}{}",
            self.port, self.start_token
        )
    }

    fn cookie_name(&self) -> String {
        format!("cis2_agent_signin_{}", self.port)
    }

    /// Waits for the one callback with `expected_state`, from the browser that opened the start URL
    /// (which is sent on to `authorize_url`). `issuer`: when the answer carries `iss` (RFC 9207) it
    /// must be this, exactly. The listener is closed when this returns.
    pub async fn wait(
        self,
        authorize_url: &str,
        expected_state: &str,
        issuer: &str,
        timeout: Duration,
    ) -> Result<Callback, CallbackError> {
        let flow = Flow {
            start_path: format!("{START_PATH}{}", self.start_token),
            authorize_url,
            expected_state,
            issuer,
            cookie_name: self.cookie_name(),
            binding: &self.binding,
        };
        let mut started = false;
        let (tx, mut rx) = mpsc::channel::<Incoming>(16);
        let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    // At most a few connections are read at once; the rest wait in the backlog.
                    Ok((stream, _)) => match connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                read_request(stream, tx).await;
                                drop(permit);
                            });
                        }
                        Err(_) => drop(stream),
                    },
                    // Out of file descriptors or the like: do not spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                Some(incoming) = rx.recv() => {
                    let received_at = Instant::now();
                    match judge(&incoming, &flow, &mut started) {
                        Verdict::Ignore(status, page) => {
                            let _ = incoming.reply.send(Reply::page(status, page));
                        }
                        Verdict::Start => {
                            let _ = incoming.reply.send(Reply::start(&flow));
                        }
                        Verdict::Done(result) => {
                            let page = match &result {
                                Ok(()) => page("You are signed in", "Your Care Identity sign-in reached the agent. You can close this tab and go back to your clinical system."),
                                Err(e) => page("Sign-in not completed", &format!("{e} You can close this tab.")),
                            };
                            let _ = incoming.reply.send(Reply::page(if result.is_ok() { 200 } else { 400 }, page));
                            return result.map(|()| Callback {
                                code: Secret::new(incoming.params.get("code").cloned().unwrap_or_default()),
                                received_at,
                            });
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(CallbackError::TimedOut(timeout.as_secs()));
                }
            }
        }
    }
}

struct Incoming {
    path: String,
    params: HashMap<String, String>,
    /// The `Cookie` request header(s), joined.
    cookies: String,
    reply: oneshot::Sender<Reply>,
}

/// What the listener answers one request with.
struct Reply {
    status: u16,
    body: String,
    /// Extra header lines (`Name: value\r\n` each).
    headers: String,
}

impl Reply {
    fn page(status: u16, body: String) -> Reply {
        Reply {
            status,
            body,
            headers: String::new(),
        }
    }

    /// The start URL's answer: the binding cookie, and on to the provider.
    fn start(flow: &Flow<'_>) -> Reply {
        Reply {
            status: 302,
            body: String::new(),
            headers: format!(
                "Location: {}\r\nSet-Cookie: {}={}; HttpOnly; SameSite=Lax; Path=/\r\n",
                flow.authorize_url, flow.cookie_name, flow.binding
            ),
        }
    }
}

/// One sign-in as the listener sees it.
struct Flow<'a> {
    start_path: String,
    authorize_url: &'a str,
    expected_state: &'a str,
    issuer: &'a str,
    cookie_name: String,
    binding: &'a str,
}

enum Verdict {
    Ignore(u16, String),
    /// The start URL, opened for the first time.
    Start,
    Done(Result<(), CallbackError>),
}

/// Whether the request's cookies hold `name=value`; the value is compared in constant time.
fn has_cookie(cookies: &str, name: &str, value: &str) -> bool {
    use sha2::{Digest, Sha256};
    let expected = Sha256::digest(value.as_bytes());
    cookies
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .any(|(_, v)| Sha256::digest(v.as_bytes()) == expected)
}

fn judge(incoming: &Incoming, flow: &Flow<'_>, started: &mut bool) -> Verdict {
    if incoming.path == flow.start_path {
        if std::mem::replace(started, true) {
            return Verdict::Done(Err(CallbackError::StartedTwice));
        }
        return Verdict::Start;
    }
    if incoming.path != CALLBACK_PATH {
        return Verdict::Ignore(404, page("Not found", "Nothing here."));
    }
    let params = &incoming.params;
    if params.get("state").map(String::as_str) != Some(flow.expected_state) {
        // A stale tab or a forged link: answered, but the sign-in keeps waiting for the real one.
        return Verdict::Ignore(
            400,
            page(
                "Sign-in link not recognised",
                "This page does not belong to the sign-in the agent is waiting for. If you started a new sign-in, finish it in its own tab.",
            ),
        );
    }
    // The right state from a browser that did not start this sign-in: the state got out, so the
    // sign-in is ended rather than risk signing this user in as someone else.
    if !*started || !has_cookie(&incoming.cookies, &flow.cookie_name, flow.binding) {
        return Verdict::Done(Err(CallbackError::NotThisBrowser));
    }
    if let Some(iss) = params.get("iss")
        && iss != flow.issuer
    {
        return Verdict::Done(Err(CallbackError::WrongIssuer { found: iss.clone() }));
    }
    if let Some(error) = params.get("error") {
        return Verdict::Done(Err(CallbackError::Provider {
            error: error.clone(),
            sentence: explain_provider_error(
                error,
                params.get("error_description").map(String::as_str),
            ),
        }));
    }
    match params.get("code") {
        Some(code) if !code.is_empty() => Verdict::Done(Ok(())),
        _ => Verdict::Done(Err(CallbackError::NoCode)),
    }
}

async fn read_request(mut stream: TcpStream, tx: mpsc::Sender<Incoming>) {
    let head = tokio::time::timeout(REQUEST_READ_TIMEOUT, async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            // Only the new bytes (and the three before them) can complete the end of the head.
            let from = head.len().saturating_sub(3);
            head.extend_from_slice(&buf[..n]);
            if head[from..].windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_REQUEST_HEAD {
                break;
            }
        }
        Some(head)
    })
    .await;
    let Ok(Some(head)) = head else { return };
    let mut head_lines = head
        .split(|b| *b == b'\n')
        .map(|line| String::from_utf8_lossy(line).trim_end().to_string());
    let first_line = head_lines.next().unwrap_or_default();
    let cookies = head_lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("cookie")
                .then(|| value.trim().to_string())
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut words = first_line.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        respond(&mut stream, 400, &page("Bad request", "")).await;
        return;
    };
    if method != "GET" {
        respond(&mut stream, 405, &page("Not allowed", "")).await;
        return;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let (reply_tx, reply_rx) = oneshot::channel();
    let incoming = Incoming {
        path: path.to_string(),
        params,
        cookies,
        reply: reply_tx,
    };
    if tx.send(incoming).await.is_err() {
        return;
    }
    if let Ok(reply) = reply_rx.await {
        respond_with(&mut stream, &reply).await;
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) {
    respond_with(stream, &Reply::page(status, body.to_string())).await;
}

async fn respond_with(stream: &mut TcpStream, reply: &Reply) {
    let (status, body) = (reply.status, &reply.body);
    let reason = match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
{}Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        reply.headers
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn page(title: &str, text: &str) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title></head>\
<body style=\"font-family:Arial,sans-serif;max-width:40em;margin:3em auto\"><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_with(
        port: u16,
        target: &str,
        cookie: Option<&str>,
    ) -> Result<(u16, String), String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        stream
            .write_all(
                format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}\r\n").as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, text))
    }

    async fn get(port: u16, target: &str) -> Result<(u16, String), String> {
        get_with(port, target, None).await
    }

    /// Opens the start URL as a browser would; returns the cookie it set (`name=value`).
    async fn start(port: u16, start_url: &str) -> String {
        let path = start_url.split_once(&format!(":{port}")).unwrap().1;
        let (status, text) = get(port, path).await.unwrap();
        assert_eq!(status, 302, "{text}");
        assert!(
            text.contains(&format!("\r\nLocation: {AUTHORIZE}\r\n")),
            "{text}"
        );
        let set_cookie = text
            .lines()
            .find_map(|l| l.strip_prefix("Set-Cookie: "))
            .unwrap();
        assert!(
            set_cookie.ends_with("; HttpOnly; SameSite=Lax; Path=/"),
            "{set_cookie}"
        );
        set_cookie.split(';').next().unwrap().to_string()
    }

    const ISS: &str = "https://cis2.example:443/realm";
    const AUTHORIZE: &str = "https://cis2.example:443/realm/authorize?state=s";

    /// A listener waiting for state `s`; its port and start URL.
    async fn waiting(
        state: &'static str,
    ) -> (
        u16,
        String,
        tokio::task::JoinHandle<Result<Callback, CallbackError>>,
    ) {
        let listener = LoopbackListener::bind(&[]).await.unwrap();
        let (port, start_url) = (listener.port(), listener.start_url());
        let waiter = tokio::spawn(listener.wait(AUTHORIZE, state, ISS, Duration::from_secs(10)));
        (port, start_url, waiter)
    }

    #[tokio::test]
    async fn binds_ipv4_loopback_only() {
        let listener = LoopbackListener::bind(&[]).await.unwrap();
        let addr = listener.listener.local_addr().unwrap();
        assert_eq!(addr.ip(), std::net::IpAddr::from(Ipv4Addr::LOCALHOST));
        assert!(listener.redirect_uri().starts_with("http://127.0.0.1:"));
        assert!(listener.start_url().starts_with("http://127.0.0.1:"));
        assert!(!listener.start_url().contains("state"));
    }

    #[tokio::test]
    async fn takes_the_first_free_port_of_the_list() {
        let busy = LoopbackListener::bind(&[]).await.unwrap();
        let free = {
            let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
            probe.local_addr().unwrap().port()
        };
        let listener = LoopbackListener::bind(&[busy.port(), free]).await.unwrap();
        assert_eq!(listener.port(), free);
        assert!(matches!(
            LoopbackListener::bind(&[busy.port()]).await,
            Err(CallbackError::Bind(_))
        ));
    }

    #[tokio::test]
    async fn noise_and_wrong_state_are_ignored_then_one_callback_is_taken_and_the_port_closes() {
        let (port, start_url, waiter) = waiting("good-state").await;
        let cookie = start(port, &start_url).await;
        assert_eq!(get(port, "/favicon.ico").await.unwrap().0, 404);
        assert_eq!(
            get_with(port, "/callback?code=evil&state=other", Some(&cookie))
                .await
                .unwrap()
                .0,
            400
        );
        let (status, page) = get_with(
            port,
            "/callback?code=the-code&state=good-state",
            Some(&cookie),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert!(page.contains("close this tab"));
        let callback = waiter.await.unwrap().unwrap();
        assert_eq!(callback.code.expose(), "the-code");
        assert!(
            get_with(
                port,
                "/callback?code=second&state=good-state",
                Some(&cookie)
            )
            .await
            .is_err(),
            "a second callback finds the port closed"
        );
    }

    #[tokio::test]
    async fn a_callback_without_the_start_cookie_ends_the_sign_in_with_an_error() {
        // Another user who learned the state delivers their own code: refused, and nothing is taken.
        let (port, start_url, waiter) = waiting("s").await;
        let cookie = start(port, &start_url).await;
        let (status, _) = get_with(
            port,
            "/callback?code=attacker&state=s",
            Some("cis2_agent_signin_1=x"),
        )
        .await
        .unwrap();
        assert_eq!(status, 400);
        assert_eq!(
            waiter.await.unwrap().unwrap_err(),
            CallbackError::NotThisBrowser
        );
        assert!(
            get_with(port, "/callback?code=c&state=s", Some(&cookie))
                .await
                .is_err()
        );

        // Nor is a callback taken before anyone opened the start URL.
        let (port, _, waiter) = waiting("s").await;
        assert_eq!(get(port, "/callback?code=c&state=s").await.unwrap().0, 400);
        assert_eq!(
            waiter.await.unwrap().unwrap_err(),
            CallbackError::NotThisBrowser
        );
    }

    #[tokio::test]
    async fn a_second_opening_of_the_start_url_cancels_the_sign_in_for_everyone() {
        let (port, start_url, waiter) = waiting("s").await;
        let first = start(port, &start_url).await;
        let path = start_url.split_once(&format!(":{port}")).unwrap().1;
        let (status, page) = get(port, path).await.unwrap();
        assert_eq!(status, 400);
        assert!(page.contains("opened twice"), "{page}");
        assert_eq!(
            waiter.await.unwrap().unwrap_err(),
            CallbackError::StartedTwice
        );
        assert!(
            get_with(port, "/callback?code=c&state=s", Some(&first))
                .await
                .is_err(),
            "not even the first browser can finish it"
        );
    }

    #[tokio::test]
    async fn an_error_callback_becomes_a_sentence() {
        let (port, start_url, waiter) = waiting("s").await;
        let cookie = start(port, &start_url).await;
        let (status, page) = get_with(
            port,
            "/callback?error=access_denied&error_description=the%20user%20cancelled&state=s",
            Some(&cookie),
        )
        .await
        .unwrap();
        assert_eq!(status, 400);
        assert!(page.contains("cancelled or refused"));
        match waiter.await.unwrap() {
            Err(CallbackError::Provider { error, sentence }) => {
                assert_eq!(error, "access_denied");
                assert!(
                    sentence.contains("cancelled or refused")
                        && sentence.contains("the user cancelled")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_naming_another_issuer_is_refused() {
        let (port, start_url, waiter) = waiting("s").await;
        let cookie = start(port, &start_url).await;
        get_with(
            port,
            "/callback?code=c&state=s&iss=https%3A%2F%2Fevil.example",
            Some(&cookie),
        )
        .await
        .unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(CallbackError::WrongIssuer { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_timeout() {
        let listener = LoopbackListener::bind(&[]).await.unwrap();
        let result = listener
            .wait(AUTHORIZE, "s", ISS, Duration::from_secs(300))
            .await;
        assert_eq!(result.unwrap_err(), CallbackError::TimedOut(300));
    }

    #[tokio::test]
    async fn a_silent_connection_does_not_block_the_real_callback() {
        let (port, start_url, waiter) = waiting("s").await;
        let _preconnect = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let cookie = start(port, &start_url).await;
        assert_eq!(
            get_with(port, "/callback?code=c&state=s", Some(&cookie))
                .await
                .unwrap()
                .0,
            200
        );
        assert!(waiter.await.unwrap().is_ok());
    }
}
