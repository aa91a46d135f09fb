//! Serving HTTP for the sandbox provider and the relay: a rustls acceptor (TLS 1.2 and 1.3, ring) behind
//! axum's `Listener`, so either serves HTTPS from a PEM certificate and key with the same code, and
//! [`serve`], a server loop that — unlike `axum::serve` — gives up on clients that are slow to send their
//! request headers and ends in bounded time when asked to stop.

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why a certificate and key could not become a server config. Each kind is its own variant, so a caller
/// can tell a missing block from a damaged one or a pair that does not match; the details quote the PEM
/// parser or rustls, never the key's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error("the certificate PEM is unreadable: {detail}")]
    CertificateUnreadable { detail: String },
    #[error("the certificate file holds no CERTIFICATE block")]
    NoCertificate,
    #[error("the key file holds no private key")]
    NoPrivateKey,
    #[error("the key PEM is unreadable: {detail}")]
    KeyUnreadable { detail: String },
    /// rustls refused the protocol versions asked for (TLS 1.2 and 1.3): a build problem, not the files'.
    #[error("{detail}")]
    Protocols { detail: String },
    #[error("the certificate and key do not make a usable pair: {detail}")]
    KeyDoesNotMatch { detail: String },
}

/// Builds a server config from PEM text: a certificate chain and its private key.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::CertificateUnreadable {
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsConfigError::NoPrivateKey,
        e => TlsConfigError::KeyUnreadable {
            detail: e.to_string(),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsConfigError::Protocols {
            detail: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsConfigError::KeyDoesNotMatch {
            detail: e.to_string(),
        })
}

/// How many TLS handshakes may be under way at once.
const MAX_HANDSHAKES: usize = 256;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener that hands axum finished TLS streams. Handshakes run side by side in their own
/// tasks (at most [`MAX_HANDSHAKES`], each at most [`HANDSHAKE_TIMEOUT`]), so a client that connects
/// and says nothing holds up only itself; failed handshakes are dropped, not fatal.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Must be called inside a Tokio runtime: it starts the accepting task.
    pub fn new(tcp: TcpListener, config: rustls::ServerConfig) -> TlsListener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = tcp.accept() => accepted,
                    // The server has stopped: let go of the port.
                    () = tx.closed() => return,
                };
                let (stream, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, usually: wait for some to be given back.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let permit = tokio::select! {
                    permit = handshakes.clone().acquire_owned() => permit,
                    () = tx.closed() => return,
                };
                let Ok(permit) = permit else {
                    return;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        let _ = tx.send((tls, addr)).await;
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accepting task ended (its runtime is shutting down): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The peer of a connection, plain or TLS: what the admin API checks for loopback.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// How [`serve`] treats slow clients and a stop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// How long a client has to send a request's headers, from connecting or from the end of its last
    /// answer. A connection that runs out of it is closed: idle keep-alive connections go the same way.
    pub header_read_timeout: Duration,
    /// How long, once told to stop, requests under way may take to finish before the loop returns anyway.
    pub drain: Duration,
}

/// Serves `app` over HTTP/1.1 on `listener` until `stop` completes, then stops accepting, lets the
/// requests under way finish for at most `limits.drain`, and returns. Handlers may extract
/// `ConnectInfo<Peer>`.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()>,
) where
    L: Listener<Addr = SocketAddr>,
{
    let connections = GracefulShutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        while tasks.try_join_next().is_some() {}
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(Peer(addr)));
                tower::ServiceExt::oneshot(app.clone(), request)
            },
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(io), service);
        let connection = connections.watch(connection);
        tasks.spawn(async move {
            // A client that goes away or is too slow ends only its own connection.
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.drain, connections.shutdown()).await;
    // What did not finish in time is cut off: nothing of the server outlives the call.
    tasks.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_certificates_and_keys_are_read_in_every_form_and_mistakes_are_named() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        assert!(server_config(&cert_pem, &key_pem).is_ok());
        // A chain file with text around the block, as openssl writes it, and the key first.
        let noisy = format!("subject=CN = localhost\n{cert_pem}\n");
        assert!(server_config(&noisy, &format!("{key_pem}{cert_pem}")).is_ok());
        let no_certificate = server_config("", &key_pem).unwrap_err();
        assert_eq!(no_certificate, TlsConfigError::NoCertificate);
        assert_eq!(
            no_certificate.to_string(),
            "the certificate file holds no CERTIFICATE block"
        );
        let no_key = server_config(&cert_pem, &cert_pem).unwrap_err();
        assert_eq!(no_key, TlsConfigError::NoPrivateKey);
        assert_eq!(no_key.to_string(), "the key file holds no private key");
        let damaged = key_pem.replacen("\n", "\n!!", 1);
        let err = server_config(&cert_pem, &damaged).unwrap_err();
        assert!(
            matches!(err, TlsConfigError::KeyUnreadable { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("the key PEM is unreadable"),
            "{err}"
        );
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let err = server_config(&cert_pem, &other.key_pair.serialize_pem()).unwrap_err();
        assert!(
            matches!(err, TlsConfigError::KeyDoesNotMatch { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("do not make a usable pair"),
            "{err}"
        );
    }

    /// What is said about a damaged key names the problem, not the key: no line of its base64 text
    /// appears in the error, shown or debugged.
    #[test]
    fn a_damaged_key_is_not_quoted_in_the_error() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
        let damaged = key_pem.replacen("\n", "\n!!", 1);
        let err = server_config(&cert_pem, &damaged).unwrap_err();
        let (shown, debugged) = (err.to_string(), format!("{err:?}"));
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !shown.contains(line) && !debugged.contains(line),
                "{shown} / {debugged}"
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_connects_and_says_nothing_does_not_hold_up_the_next() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let config = server_config(&cert.cert.pem(), &cert.key_pair.serialize_pem()).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let listener = TlsListener::new(tcp, config);
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });

        // Silent connections, each of which would block a one-at-a-time handshake for 10 s.
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap(),
            )
            .build()
            .unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.get(format!("https://localhost:{port}/")).send(),
        )
        .await
        .expect("answered while the silent connections wait")
        .unwrap();
        assert_eq!(answer.text().await.unwrap(), "ok");
        drop(silent);
    }

    /// Serves `app` on a loopback port with the given limits; the sender stops it, the handle is the loop.
    async fn serving(
        app: Router,
        limits: ServeLimits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(tcp, app, limits, async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    const LIMITS: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_millis(500),
        drain: Duration::from_secs(2),
    };

    #[tokio::test]
    async fn a_client_slow_to_send_its_headers_loses_the_connection_and_others_are_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<Peer>| async move {
                peer.0.ip().to_string()
            }),
        );
        let (addr, _stop, _task) = serving(app, LIMITS).await;

        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        let answer = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert_eq!(answer.text().await.unwrap(), "127.0.0.1");

        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the half-sent request still holds its connection after 5 s"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "closed before the client had its time: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_stop_lets_a_request_under_way_finish() {
        let app = Router::new().route(
            "/",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "finished"
            }),
        );
        let (addr, stop, task) = serving(app, LIMITS).await;
        let request = tokio::spawn(reqwest::get(format!("http://{addr}/")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        let answer = request.await.unwrap().unwrap();
        assert_eq!(answer.text().await.unwrap(), "finished");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop returns once the request is answered")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the port is still accepting after the stop"
        );
    }

    #[tokio::test]
    async fn a_stop_ends_in_bounded_time_while_an_answer_streams_forever() {
        let app = Router::new().route(
            "/",
            axum::routing::get(|| async {
                let forever = futures_stream_forever();
                axum::body::Body::from_stream(forever)
            }),
        );
        let (addr, stop, task) = serving(app, LIMITS).await;
        let mut answer = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert!(answer.chunk().await.unwrap().is_some());
        let started = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop returns while the stream is still open")
            .unwrap();
        assert!(started.elapsed() >= LIMITS.drain - Duration::from_millis(100));
    }

    /// A body that sends a line every 100 ms and never ends.
    fn futures_stream_forever()
    -> impl futures_util::Stream<Item = Result<&'static str, std::convert::Infallible>> {
        futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok("tick\n"), ()))
        })
    }
}
