//! The agent's side of `cis2-relay` (cis2-reference.md §3): the code, the PKCE verifier and the redirect
//! URI go to the vendor's relay, which holds the client key and redeems them at CIS2; and the agent keeps a
//! server-sent-events subscription open there so CIS2's back-channel logout reaches it.

use crate::claims::User;
use crate::http::{HttpClient, ProviderError, Unreached};
use crate::secret::Secret;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// The relay's answer to `/v1/token` and `/v1/refresh` (interfaces.md).
#[derive(Debug, Clone, Deserialize)]
pub struct RelayTokens {
    pub access_token: Secret,
    pub expires_at: u64,
    /// Seconds left at the relay when it answered: preferred to `expires_at`, so a desktop clock that
    /// is wrong does not shorten or stretch the token.
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    #[serde(default)]
    pub id_token: Option<Secret>,
    /// The subject the relay fetched userinfo for; the agent checks it against the ID token.
    pub sub: String,
    pub user: User,
    /// Opens the relay's event stream for this session (absent when the answer names no session).
    #[serde(default)]
    pub events_ticket: Option<Secret>,
}

/// The relay's answer to `/v1/exchange`.
#[derive(Debug, Clone, Deserialize)]
pub struct RelayExchanged {
    pub access_token: Secret,
    /// Seconds left when the relay answered (preferred to a desktop clock's view of `expires_at`).
    pub expires_in: u64,
}

/// How long the event stream may stay silent before the agent treats it as dead (the relay sends a
/// keep-alive comment every 15 seconds).
pub const EVENTS_IDLE_LIMIT: Duration = Duration::from_secs(45);
/// The longest SSE line the agent reads; an event is a few hundred bytes.
const MAX_EVENT_LINE: usize = 8 * 1024;

#[derive(Debug, Clone)]
pub struct RelayClient {
    base: String,
    http: HttpClient,
    stream: HttpClient,
}

impl RelayClient {
    /// `base_url` is `relay_url` from the config (checked there: https, or http on loopback).
    pub fn new(
        base_url: &str,
        extra_ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<RelayClient, crate::http::HttpSetupError> {
        let mut base = base_url.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Ok(RelayClient {
            base,
            http: HttpClient::unpooled(extra_ca_pem, timeout)?,
            stream: HttpClient::streaming(extra_ca_pem, EVENTS_IDLE_LIMIT)?,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The tokens for a code, and how long the relay took (its provider calls included).
    pub async fn token(
        &self,
        code: &Secret,
        code_verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<(RelayTokens, Duration), ProviderError> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            code: &'a str,
            code_verifier: &'a str,
            redirect_uri: &'a str,
        }
        self.post(
            "v1/token",
            &Body {
                code: code.expose(),
                code_verifier: code_verifier.expose(),
                redirect_uri,
            },
        )
        .await
    }

    pub async fn refresh(
        &self,
        refresh_token: &Secret,
    ) -> Result<(RelayTokens, Duration), ProviderError> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            refresh_token: &'a str,
        }
        self.post(
            "v1/refresh",
            &Body {
                refresh_token: refresh_token.expose(),
            },
        )
        .await
    }

    /// Asks the relay to revoke a refresh token at CIS2 with the client's credentials (the agent has
    /// none). `Ok(false)`: CIS2 offers no revocation endpoint.
    pub async fn revoke(&self, refresh_token: &Secret) -> Result<bool, ProviderError> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            refresh_token: &'a str,
        }
        #[derive(Deserialize)]
        struct Revoked {
            revoked: bool,
        }
        let (answer, _): (Revoked, _) = self
            .post(
                "v1/revoke",
                &Body {
                    refresh_token: refresh_token.expose(),
                },
            )
            .await?;
        Ok(answer.revoked)
    }

    /// The API Platform access token for the session of `id_token`, exchanged by the relay for the
    /// relay's audience `audience` (`POST /v1/exchange`), and how long the relay took.
    pub async fn exchange(
        &self,
        id_token: &Secret,
        audience: &str,
    ) -> Result<(RelayExchanged, Duration), ProviderError> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            id_token: &'a str,
            audience: &'a str,
        }
        self.post(
            "v1/exchange",
            &Body {
                id_token: id_token.expose(),
                audience,
            },
        )
        .await
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(T, Duration), ProviderError> {
        // Serialised from borrowed secrets into a buffer that is wiped once reqwest has its copy.
        let body = zeroize::Zeroizing::new(serde_json::to_vec(body).unwrap_or_default());
        let request = self
            .http
            .inner()
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_vec());
        let sent = Instant::now();
        let tokens = self.http.json("the relay", request).await?;
        Ok((tokens, sent.elapsed()))
    }

    /// Waits on the relay's event stream for the CIS2 session `sid` of the person `sub`, and returns when
    /// the relay reports that CIS2 ended it (by `sid`, or all of `sub`'s sessions). `ticket` is the
    /// `events_ticket` that came with the session's tokens. An error means the stream broke or was
    /// refused (the caller reconnects with backoff); `on_open` runs once the relay has accepted it.
    pub async fn wait_for_logout(
        &self,
        sid: &str,
        sub: &str,
        ticket: &Secret,
        on_open: impl FnOnce(),
    ) -> Result<(), ProviderError> {
        let what = "the relay's event stream";
        let url = format!("{}v1/events", self.base);
        let mut response = self
            .stream
            .inner()
            .get(url)
            .query(&[("sid", sid), ("sub", sub)])
            .bearer_auth(ticket.expose())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| {
                let e = e.without_url();
                ProviderError::Unreachable {
                    what: what.into(),
                    cause: Unreached::of(&e),
                    detail: e.to_string(),
                }
            })?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(ProviderError::Status {
                what: what.into(),
                status,
                description: None,
                oauth_error: None,
            });
        }
        on_open();
        let mut events = EventReader::default();
        loop {
            let chunk = response.chunk().await.map_err(|e| {
                let e = e.without_url();
                ProviderError::Unreachable {
                    what: what.into(),
                    cause: Unreached::of(&e),
                    detail: e.to_string(),
                }
            })?;
            let Some(chunk) = chunk else {
                return Err(ProviderError::Unreachable {
                    what: what.into(),
                    cause: Unreached::ConnectionClosed,
                    detail: "the relay closed the stream".into(),
                });
            };
            for event in events
                .feed(&chunk)
                .map_err(|detail| ProviderError::Garbage {
                    what: what.into(),
                    detail,
                })?
            {
                if event == "logout" {
                    return Ok(());
                }
            }
        }
    }
}

/// The `event:` names of complete server-sent events, from bytes as they arrive.
#[derive(Debug, Default)]
pub struct EventReader {
    line: Vec<u8>,
    event: Option<String>,
}

impl EventReader {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                if self.line.len() >= MAX_EVENT_LINE {
                    return Err(format!("a line longer than {MAX_EVENT_LINE} bytes"));
                }
                self.line.push(byte);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&line);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                // A blank line dispatches the event; one without `event:` is a "message".
                if let Some(event) = self.event.take() {
                    done.push(event);
                }
            } else if let Some(name) = line.strip_prefix("event:") {
                self.event = Some(name.trim_start().to_string());
            } else if line.starts_with("data:") && self.event.is_none() {
                self.event = Some("message".into());
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_when_their_blank_line_arrives_even_split_across_chunks() {
        let mut reader = EventReader::default();
        assert!(
            reader
                .feed(b": keep-alive\n\nevent: subscr")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            reader.feed(b"ibed\ndata: {}\n\nevent: logo").unwrap(),
            vec!["subscribed".to_string()]
        );
        assert!(
            reader
                .feed(b"ut\r\ndata: {\"sid\":\"s\"}\r\n")
                .unwrap()
                .is_empty()
        );
        assert_eq!(reader.feed(b"\r\n").unwrap(), vec!["logout".to_string()]);
    }

    #[test]
    fn an_endless_line_is_an_error_not_unbounded_memory() {
        let mut reader = EventReader::default();
        let long = vec![b'x'; MAX_EVENT_LINE + 1];
        assert!(reader.feed(&long).is_err());
    }

    #[test]
    fn the_base_url_always_ends_with_a_slash() {
        let relay =
            RelayClient::new("https://relay.example/base", None, Duration::from_secs(5)).unwrap();
        assert_eq!(relay.base_url(), "https://relay.example/base/");
    }
}
