//! The agent's HTTP client for the provider: rustls with TLS 1.2 or later, the system's roots plus an
//! optional extra trust anchor, redirects never followed, connect and total timeouts, and answers
//! capped in size. Every failure becomes a [`ProviderError`] that says what happened without quoting
//! a token.

use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// The largest answer read from a provider (a JWKS or a token response is a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// What went wrong talking to the provider (or relay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("{what} could not be reached: {detail}")]
    Unreachable { what: String, detail: String },
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
    pub fn new(extra_ca_pem: Option<&str>, timeout: Duration) -> Result<HttpClient, String> {
        let client = builder(extra_ca_pem)?
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot set up HTTPS: {e}"))?;
        Ok(HttpClient { client, timeout })
    }

    /// Like [`HttpClient::new`], but every request uses a fresh connection that is closed after it: no
    /// idle connection keeps a buffer that held a token (the agent's choice; its provider calls are a
    /// sign-in and a refresh now and then, so the extra handshake costs nothing that matters).
    pub fn unpooled(extra_ca_pem: Option<&str>, timeout: Duration) -> Result<HttpClient, String> {
        let client = builder(extra_ca_pem)?
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot set up HTTPS: {e}"))?;
        Ok(HttpClient { client, timeout })
    }

    /// For a long-lived answer (server-sent events): no total timeout, but a connection that stays
    /// silent for `idle` counts as dead.
    pub fn streaming(extra_ca_pem: Option<&str>, idle: Duration) -> Result<HttpClient, String> {
        let client = builder(extra_ca_pem)?
            .connect_timeout(Duration::from_secs(5).min(idle))
            .read_timeout(idle)
            .build()
            .map_err(|e| format!("cannot set up HTTPS: {e}"))?;
        Ok(HttpClient {
            client,
            timeout: idle,
        })
    }

    pub fn with_ca_file(path: Option<&Path>, timeout: Duration) -> Result<HttpClient, String> {
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
pub fn read_ca_file(path: Option<&Path>) -> Result<Option<String>, String> {
    match path {
        Some(path) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display())),
        None => Ok(None),
    }
}

fn builder(extra_ca_pem: Option<&str>) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cis2-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("the extra CA file is not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("the extra CA file holds no certificate".into());
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
