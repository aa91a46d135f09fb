//! Discovery and the provider's keys, cached: the document for up to an hour, the JWKS until a token
//! names a key it does not hold — then fetched again, at most once per [`JWKS_REFETCH_INTERVAL_SECS`],
//! which is how CIS2's key rotation reaches relying parties.

use crate::clock::SharedClock;
use crate::http::{HttpClient, ProviderError};
use cis2_jose::JwkSet;
use serde::Deserialize;
use std::sync::Mutex;

pub const DISCOVERY_TTL_SECS: u64 = 3600;
pub const JWKS_TTL_SECS: u64 = 3600;
pub const JWKS_REFETCH_INTERVAL_SECS: u64 = 30;

/// The parts of the discovery document the agent uses. Endpoints are kept as strings, byte for byte.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ProviderMetadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    pub jwks_uri: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub id_token_signing_alg_values_supported: Option<Vec<String>>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub scopes_supported: Option<Vec<String>>,
}

/// Why the provider's metadata or keys are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(
        "the discovery document names issuer {found:?}, but the agent is configured for {expected:?}; \
         they must match exactly (check [provider] issuer, including any :443)"
    )]
    IssuerMismatch { expected: String, found: String },
    #[error("the provider does not support PKCE with S256, which the agent requires")]
    NoPkce,
}

impl DiscoveryError {
    pub fn is_outage(&self) -> bool {
        matches!(self, DiscoveryError::Provider(e) if e.is_outage())
    }
}

struct Cached<T> {
    value: T,
    fetched_at: u64,
}

pub struct Discovery {
    issuer: String,
    http: HttpClient,
    clock: SharedClock,
    metadata: Mutex<Option<Cached<ProviderMetadata>>>,
    jwks: Mutex<Option<Cached<JwkSet>>>,
    last_forced_jwks_fetch: Mutex<Option<u64>>,
}

impl Discovery {
    pub fn new(issuer: String, http: HttpClient, clock: SharedClock) -> Discovery {
        Discovery {
            issuer,
            http,
            clock,
            metadata: Mutex::new(None),
            jwks: Mutex::new(None),
            last_forced_jwks_fetch: Mutex::new(None),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The discovery URL: the issuer without a trailing `/`, plus the well-known path (Discovery §4).
    pub fn url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }

    /// The provider's metadata, from the cache when it is younger than an hour.
    pub async fn metadata(&self) -> Result<ProviderMetadata, DiscoveryError> {
        let now = self.clock.now();
        if let Some(cached) = lock(&self.metadata).as_ref()
            && now.saturating_sub(cached.fetched_at) < DISCOVERY_TTL_SECS
        {
            return Ok(cached.value.clone());
        }
        let metadata: ProviderMetadata = self
            .http
            .json(
                "the provider's discovery document",
                self.http.inner().get(self.url()),
            )
            .await?;
        if metadata.issuer != self.issuer {
            return Err(DiscoveryError::IssuerMismatch {
                expected: self.issuer.clone(),
                found: metadata.issuer,
            });
        }
        if let Some(methods) = &metadata.code_challenge_methods_supported
            && !methods.iter().any(|m| m == "S256")
        {
            return Err(DiscoveryError::NoPkce);
        }
        *lock(&self.metadata) = Some(Cached {
            value: metadata.clone(),
            fetched_at: now,
        });
        Ok(metadata)
    }

    /// The provider's keys. `refresh_for_unknown_kid`: a token named a key the cache lacks; fetch again
    /// unless that was done within the last [`JWKS_REFETCH_INTERVAL_SECS`]. Returns whether it fetched.
    pub async fn jwks(
        &self,
        refresh_for_unknown_kid: bool,
    ) -> Result<(JwkSet, bool), DiscoveryError> {
        let now = self.clock.now();
        let cached = lock(&self.jwks)
            .as_ref()
            .filter(|c| now.saturating_sub(c.fetched_at) < JWKS_TTL_SECS)
            .map(|c| c.value.clone());
        match (cached, refresh_for_unknown_kid) {
            (Some(keys), false) => return Ok((keys, false)),
            (Some(keys), true) => {
                let mut last = lock(&self.last_forced_jwks_fetch);
                if last.is_some_and(|t| now.saturating_sub(t) < JWKS_REFETCH_INTERVAL_SECS) {
                    return Ok((keys, false));
                }
                *last = Some(now);
            }
            (None, _) => {}
        }
        let metadata = self.metadata().await?;
        let keys: JwkSet = self
            .http
            .json(
                "the provider's key set (jwks_uri)",
                self.http.inner().get(&metadata.jwks_uri),
            )
            .await?;
        *lock(&self.jwks) = Some(Cached {
            value: keys.clone(),
            fetched_at: now,
        });
        Ok((keys, true))
    }
}

impl Discovery {
    /// Runs `check` against the provider's keys. When it fails because a token names a key the
    /// cache lacks (`unknown_key`), the keys are fetched again — once, rate-limited: the provider may
    /// have rotated — and `check` runs again. ID tokens and logout tokens both go through here.
    pub async fn check_with_keys<T, E>(
        &self,
        check: impl Fn(&JwkSet) -> Result<T, E>,
        unknown_key: impl Fn(&E) -> bool,
    ) -> Result<Result<T, E>, DiscoveryError> {
        let (keys, _) = self.jwks(false).await?;
        match check(&keys) {
            Err(e) if unknown_key(&e) => {
                let (keys, _) = self.jwks(true).await?;
                Ok(check(&keys))
            }
            other => Ok(other),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
