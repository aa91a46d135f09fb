//! The agent's HTTP client for the provider: rustls with TLS 1.2 or later, the system's roots plus an
//! optional extra trust anchor, redirects never followed, connect and total timeouts, and answers
//! capped in size. Every failure becomes a [`ProviderError`] that says what happened without quoting
//! a token.

use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// The largest answer read from a provider (a JWKS or a token response is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// What went wrong talking to the provider (or relay). The kind of failure is the variant (and, for
/// [`ProviderError::Unreachable`], its [`Unreached`] cause), so a caller can act on it without reading
/// the words; the words quote neither the URL (it can carry an `id_token_hint`) nor a request body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("{what} could not be reached: {detail}")]
    Unreachable {
        what: String,
        /// Why, as far as the error chain tells: refused, a certificate or TLS failure, a stream cut.
        cause: Unreached,
        detail: String,
    },
    #[error("{what} did not answer within {secs} seconds")]
    Timeout { what: String, secs: u64 },
    #[error("{what} answered HTTP {status}{}", description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        what: String,
        status: u16,
        /// The OAuth `error` and `error_description` when the body had them.
        description: Option<String>,
        oauth_error: Option<String>,
    },
    #[error("{what} answered with something that is not the expected JSON: {detail}")]
    Garbage { what: String, detail: String },
    #[error("{what} answered with more than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge { what: String },
}

/// Why a provider or relay could not be reached: what a person can be told to check (is it running;
/// is its certificate trusted — `[provider] ca_file`; is something in the way of TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreached {
    /// Nothing listens at that address (connection refused).
    Refused,
    /// The server's certificate was not accepted (unknown issuer, expired, wrong name…).
    Certificate,
    /// The TLS handshake failed for another reason (protocol version, alert, not TLS at all).
    TlsHandshake,
    /// The connection was made, then closed or cut before the answer was complete.
    ConnectionClosed,
    /// Anything else: a name that does not resolve, no route, a proxy refusing.
    Other,
}

impl Unreached {
    /// The cause found in an error's chain: rustls and I/O errors, however deeply reqwest and hyper
    /// wrap them.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Unreached {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(cause) = Unreached::of_one(error) {
                return cause;
            }
            // `io::Error::source` skips the error it wraps (tokio-rustls wraps rustls's error in one,
            // and hyper wraps that in another): step into it instead.
            next = match error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => error.source(),
            };
        }
        Unreached::Other
    }

    fn of_one(error: &(dyn std::error::Error + 'static)) -> Option<Unreached> {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::InvalidCertificate(_) => Unreached::Certificate,
                _ => Unreached::TlsHandshake,
            });
        }
        let io = error.downcast_ref::<std::io::Error>()?;
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Some(Unreached::Refused),
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Some(Unreached::ConnectionClosed),
            _ => None,
        }
    }
}

/// Why an HTTP client could not be set up: the extra CA file (`[provider] ca_file`) is the usual
/// reason, and each way it can be wrong is its own variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpSetupError {
    #[error("cannot read ca_file {}: {source}", path.display())]
    CaFileUnreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the extra CA file is not PEM certificates: {detail}")]
    CaNotPem { detail: String },
    #[error("the extra CA file holds no certificate")]
    CaEmpty,
    #[error("cannot set up HTTPS: {detail}")]
    Tls { detail: String },
}

impl ProviderError {
    /// Whether the provider was down or unreadable (as opposed to refusing the request).
    pub fn is_outage(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status >= 500,
            ProviderError::Unreachable { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Garbage { .. }
            | ProviderError::TooLarge { .. } => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpClient {
    /// `extra_ca_pem`: PEM certificates to trust beside the system's roots.
    pub fn new(
        extra_ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpClient, HttpSetupError> {
        let client = builder(extra_ca_pem)?
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| HttpSetupError::Tls {
                detail: e.to_string(),
            })?;
        Ok(HttpClient { client, timeout })
    }

    /// Like [`HttpClient::new`], but every request uses a fresh connection that is closed after it: no
    /// idle connection keeps a buffer that held a token (the agent's choice; its provider calls are a
    /// sign-in and a refresh now and then, so the extra handshake costs nothing that matters).
    pub fn unpooled(
        extra_ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpClient, HttpSetupError> {
        let client = builder(extra_ca_pem)?
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| HttpSetupError::Tls {
                detail: e.to_string(),
            })?;
        Ok(HttpClient { client, timeout })
    }

    /// For a long-lived answer (server-sent events): no total timeout, but a connection that stays
    /// silent for `idle` counts as dead.
    pub fn streaming(
        extra_ca_pem: Option<&str>,
        idle: Duration,
    ) -> Result<HttpClient, HttpSetupError> {
        let client = builder(extra_ca_pem)?
            .connect_timeout(Duration::from_secs(5).min(idle))
            .read_timeout(idle)
            .build()
            .map_err(|e| HttpSetupError::Tls {
                detail: e.to_string(),
            })?;
        Ok(HttpClient {
            client,
            timeout: idle,
        })
    }

    pub fn with_ca_file(
        path: Option<&Path>,
        timeout: Duration,
    ) -> Result<HttpClient, HttpSetupError> {
        HttpClient::new(read_ca_file(path)?.as_deref(), timeout)
    }

    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends the request and decodes a JSON answer of a 2xx status; `what` names the endpoint in errors.
    pub async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ProviderError> {
        let (status, body) = self.send(what, request).await?;
        if !(200..300).contains(&status) {
            let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            let field = |name: &str| {
                parsed
                    .as_ref()
                    .and_then(|v| v.get(name))
                    .and_then(|v| v.as_str())
                    .map(|s| s.chars().take(300).collect::<String>())
            };
            let oauth_error = field("error");
            let description = match (&oauth_error, field("error_description")) {
                (Some(e), Some(d)) => Some(format!("{e}: {d}")),
                (Some(e), None) => Some(e.clone()),
                (None, d) => d,
            };
            return Err(ProviderError::Status {
                what: what.into(),
                status,
                description,
                oauth_error,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ProviderError::Garbage {
            what: what.into(),
            detail: e.to_string(),
        })
    }

    /// Sends the request; the status and at most [`MAX_RESPONSE_BYTES`] of body.
    pub async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), ProviderError> {
        let map_err = |e: reqwest::Error| {
            // The URL can carry secrets in its query (id_token_hint at end session): never quote it.
            let e = e.without_url();
            if e.is_timeout() {
                ProviderError::Timeout {
                    what: what.into(),
                    secs: self.timeout.as_secs().max(1),
                }
            } else {
                ProviderError::Unreachable {
                    what: what.into(),
                    cause: Unreached::of(&e),
                    detail: error_chain(&e),
                }
            }
        };
        let mut response = request.send().await.map_err(map_err)?;
        let status = response.status().as_u16();
        if response
            .content_length()
            .is_some_and(|len| len as usize > MAX_RESPONSE_BYTES)
        {
            return Err(ProviderError::TooLarge { what: what.into() });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(map_err)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ProviderError::TooLarge { what: what.into() });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }
}

/// The text of the extra CA file, if one is configured.
pub fn read_ca_file(path: Option<&Path>) -> Result<Option<String>, HttpSetupError> {
    match path {
        Some(path) => std::fs::read_to_string(path).map(Some).map_err(|source| {
            HttpSetupError::CaFileUnreadable {
                path: path.to_path_buf(),
                source,
            }
        }),
        None => Ok(None),
    }
}

fn builder(extra_ca_pem: Option<&str>) -> Result<reqwest::ClientBuilder, HttpSetupError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cis2-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
            HttpSetupError::CaNotPem {
                detail: e.to_string(),
            }
        })?;
        if certs.is_empty() {
            return Err(HttpSetupError::CaEmpty);
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// The error and its causes in one line (reqwest hides the useful part, e.g. a certificate problem).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    // URLs in reqwest errors may carry query strings (never tokens here, but keep errors short).
    text.chars().take(400).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn get(url: &str, extra_ca_pem: Option<&str>) -> ProviderError {
        let http = HttpClient::new(extra_ca_pem, Duration::from_secs(10)).unwrap();
        http.send("the test server", http.inner().get(url))
            .await
            .unwrap_err()
    }

    fn cause(error: &ProviderError) -> Unreached {
        match error {
            ProviderError::Unreachable { cause, .. } => *cause,
            other => panic!("not unreachable: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_told_apart_and_keeps_its_words() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = get(&format!("http://{addr}/"), None).await;
        assert_eq!(cause(&error), Unreached::Refused);
        assert!(error.is_outage());
        assert!(
            error
                .to_string()
                .starts_with("the test server could not be reached: "),
            "{error}"
        );
    }

    /// A server whose certificate no root vouches for: a certificate failure, which `[provider]
    /// ca_file` can fix; the same server trusted through the extra CA answers.
    #[tokio::test]
    async fn an_untrusted_certificate_is_told_apart_from_other_tls_failures() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_pem = cert.cert.pem();
        let config = cis2_tls::server_config(&cert_pem, &cert.key_pair.serialize_pem()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = [0u8; 1024];
                    let _ = tls.read(&mut request).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let url = format!("https://localhost:{port}/");
        let error = get(&url, None).await;
        assert_eq!(cause(&error), Unreached::Certificate, "{error}");
        let http = HttpClient::new(Some(&cert_pem), Duration::from_secs(10)).unwrap();
        let (status, _) = http
            .send("the test server", http.inner().get(&url))
            .await
            .unwrap();
        assert_eq!(status, 204);
    }

    /// Something that is not TLS at all on an https address: a handshake failure, not a certificate's.
    #[tokio::test]
    async fn a_server_that_does_not_speak_tls_fails_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut hello = [0u8; 512];
                let _ = tcp.read(&mut hello).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let error = get(&format!("https://{addr}/"), None).await;
        assert_eq!(cause(&error), Unreached::TlsHandshake, "{error}");
    }

    #[test]
    fn the_kinds_of_setup_failure_keep_their_words() {
        assert!(matches!(
            builder(Some("not a certificate")).unwrap_err(),
            HttpSetupError::CaEmpty | HttpSetupError::CaNotPem { .. }
        ));
        assert_eq!(
            HttpSetupError::CaEmpty.to_string(),
            "the extra CA file holds no certificate"
        );
        let missing = read_ca_file(Some(Path::new("/nowhere/ca.pem"))).unwrap_err();
        let HttpSetupError::CaFileUnreadable { path, source } = &missing else {
            panic!("{missing:?}");
        };
        assert_eq!(path, Path::new("/nowhere/ca.pem"));
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(
            missing
                .to_string()
                .starts_with("cannot read ca_file /nowhere/ca.pem: "),
            "{missing}"
        );
    }
}
