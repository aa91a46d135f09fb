//! API Platform tokens for `token` with `"audience"` (`[[provider.audiences]]`): the session's ID token
//! exchanged by the relay (RFC 8693; the platform key lives only there). Each token is cached for the
//! session it was exchanged for — the person, their CIS2 session and their selected role, since the
//! platform's token carries the role — and is never served for another: a sign-out, a hand-over or a
//! role change makes it stale, and lock and sign-out also forget it. Renewed on demand before it gets
//! within the renewal margin of expiry, one exchange at a time (single-flight: concurrent callers take
//! the token the first one fetched).

use super::{Agent, AgentError, TokenAnswer};
use crate::http::ProviderError;
use crate::oidc::rp::{Exchange, SignedIn};
use crate::secret::Secret;
use std::collections::HashMap;
use std::sync::Mutex;

/// Which session a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SessionKey {
    generation: u64,
    sub: String,
    sid: Option<String>,
    role: Option<String>,
}

impl SessionKey {
    fn of(generation: u64, session: &SignedIn) -> SessionKey {
        SessionKey {
            generation,
            sub: session.sub.clone(),
            sid: session.sid.clone(),
            role: session.user.selected_role.as_ref().map(|r| r.id.clone()),
        }
    }
}

struct Cached {
    session: SessionKey,
    token: Secret,
    expires_at: u64,
    lifetime: u64,
}

/// The cache and the single-flight lock.
#[derive(Default)]
pub(super) struct AudienceTokens {
    cache: Mutex<HashMap<String, Cached>>,
    flight: tokio::sync::Mutex<()>,
}

impl AudienceTokens {
    /// Forgets every token (sign-out, lock).
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached token for `audience` if it is this session's and lasts beyond `now + min_valid`, and,
    /// with `margin`, beyond its renewal margin too (`margin` secs, at most half its lifetime).
    fn cached(
        &self,
        audience: &str,
        session: &SessionKey,
        now: u64,
        min_valid: u64,
        margin: Option<u64>,
    ) -> Option<TokenAnswer> {
        let mut cache = self.lock();
        let entry = cache.get(audience)?;
        if &entry.session != session {
            cache.remove(audience);
            return None;
        }
        let needed = match margin {
            Some(margin) => min_valid.max(margin.min(entry.lifetime / 2)),
            None => min_valid,
        };
        (entry.expires_at > now + needed).then(|| TokenAnswer {
            access_token: entry.token.expose().to_string(),
            token_type: "Bearer",
            expires_at: entry.expires_at,
            lifetime_secs: Some(entry.lifetime),
        })
    }

    fn store(&self, audience: &str, entry: Cached) {
        self.lock().insert(audience.to_string(), entry);
    }
}

impl Agent {
    /// The audiences `token` serves here (`[[provider.audiences]]` names), for `version`.
    pub fn audience_names(&self) -> Vec<String> {
        self.inner
            .config
            .provider
            .as_ref()
            .map(|p| p.audiences.iter().map(|a| a.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The API Platform token for the configured audience `name`, lasting at least `min_valid` s.
    pub(super) async fn audience_token(
        &self,
        name: &str,
        min_valid: u64,
    ) -> Result<TokenAnswer, AgentError> {
        // Sandbox mode has no [provider] section, so no audiences.
        let configured: &[crate::config::AudienceRoute] = self
            .inner
            .config
            .provider
            .as_ref()
            .map(|p| p.audiences.as_slice())
            .unwrap_or_default();
        let Some(route) = configured.iter().find(|a| a.name == name) else {
            let known: Vec<&str> = configured.iter().map(|a| a.name.as_str()).collect();
            return Err(AgentError::BadParams(if known.is_empty() {
                "This agent serves no audiences: ask without audience for the session's token, or have the administrator add [[provider.audiences]] to the agent's config.".into()
            } else {
                format!(
                    "No audience {name:?} is configured; this agent serves {}.",
                    known.join(", ")
                )
            }));
        };
        let Exchange::Relay(relay) = &self.inner.rp.settings.exchange else {
            // The config refuses audiences without the relay; kept for a clear answer regardless.
            return Err(AgentError::BadParams(
                "Audience tokens need [provider.exchange] method = \"relay\".".into(),
            ));
        };
        let margin = self.inner.config.session.refresh_margin_secs;
        let current = || -> Result<(SessionKey, Secret), AgentError> {
            let session = self.session();
            let session = session.as_ref().ok_or_else(AgentError::not_signed_in)?;
            Ok((
                SessionKey::of(self.generation(), session),
                session.id_token.clone(),
            ))
        };
        let (key, _) = current()?;
        let cache = &self.inner.audiences;
        if let Some(answer) =
            cache.cached(name, &key, self.inner.clock.now(), min_valid, Some(margin))
        {
            return Ok(answer);
        }
        let _flight = cache.flight.lock().await;
        let (key, id_token) = current()?;
        // A caller that waited takes what the exchange before it fetched if it lasts what it asked.
        if let Some(answer) = cache.cached(name, &key, self.inner.clock.now(), min_valid, None) {
            return Ok(answer);
        }
        if id_token.expose().is_empty() {
            return Err(AgentError::NotSignedIn(
                "The session holds no ID token to exchange: sign in again (cis2ctl login).".into(),
            ));
        }
        let (answer, _) = relay
            .exchange(&id_token, &route.route)
            .await
            .map_err(|e| refused(name, e))?;
        let now = self.inner.clock.now();
        let lifetime = answer.expires_in.max(1);
        let entry = Cached {
            session: key.clone(),
            token: answer.access_token.clone(),
            expires_at: now + lifetime,
            lifetime,
        };
        let answer = TokenAnswer {
            access_token: answer.access_token.expose().to_string(),
            token_type: "Bearer",
            expires_at: entry.expires_at,
            lifetime_secs: Some(lifetime),
        };
        // A sign-out, lock or role change while the exchange ran: the token is not for the session now.
        if current().is_ok_and(|(now_key, _)| now_key == key) && self.check_unlocked().is_ok() {
            cache.store(name, entry);
            Ok(answer)
        } else {
            Err(AgentError::NotSignedIn(
                "The session changed while the API Platform token was being fetched; ask again."
                    .into(),
            ))
        }
    }
}

/// The relay's refusal as the agent's answer; the relay's description never carries a token.
fn refused(name: &str, e: ProviderError) -> AgentError {
    match &e {
        ProviderError::Status {
            status: 400,
            oauth_error: Some(code),
            ..
        } if code == "invalid_grant" => AgentError::NotSignedIn(format!(
            "The API Platform token for {name:?} was refused because the session's ID token was ({e}): sign in again (cis2ctl login)."
        )),
        ProviderError::Status { status, .. } if (400..500).contains(status) => {
            AgentError::BadParams(format!(
                "The relay would not exchange for {name:?} ({e}); check [[provider.audiences]] route against the relay's [[api_platform]]."
            ))
        }
        _ => AgentError::Unreachable(format!(
            "The API Platform token for {name:?} could not be had: {e}."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(generation: u64, role: &str) -> SessionKey {
        SessionKey {
            generation,
            sub: "555021935108".into(),
            sid: Some("sid-1".into()),
            role: Some(role.into()),
        }
    }

    fn entry(session: SessionKey, expires_at: u64, lifetime: u64) -> Cached {
        Cached {
            session,
            token: Secret::new("apim-token"),
            expires_at,
            lifetime,
        }
    }

    #[test]
    fn a_token_is_served_only_to_its_session_and_role_and_only_while_it_lasts() {
        let tokens = AudienceTokens::default();
        tokens.store("apim", entry(key(1, "r1"), 1_600, 600));
        let hit = tokens.cached("apim", &key(1, "r1"), 1_000, 0, Some(60));
        assert_eq!(hit.map(|a| a.expires_at), Some(1_600));
        // Inside the renewal margin (60 s): renewed ahead of need, though a waiter may still take it.
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_545, 0, Some(60))
                .is_none()
        );
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_545, 10, None)
                .is_some()
        );
        // It does not last what was asked.
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_000, 600, Some(60))
                .is_none()
        );
        // Another role (a role change), or another generation (sign-out, hand-over): never served,
        // and forgotten.
        assert!(
            tokens
                .cached("apim", &key(1, "r2"), 1_000, 0, None)
                .is_none()
        );
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_000, 0, None)
                .is_none()
        );
        tokens.store("apim", entry(key(1, "r1"), 1_600, 600));
        assert!(
            tokens
                .cached("apim", &key(2, "r1"), 1_000, 0, None)
                .is_none()
        );
        tokens.store("apim", entry(key(1, "r1"), 1_600, 600));
        tokens.clear();
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_000, 0, None)
                .is_none()
        );
        assert!(
            tokens
                .cached("other", &key(1, "r1"), 1_000, 0, None)
                .is_none()
        );
    }

    #[test]
    fn a_short_lived_token_is_renewed_at_half_its_lifetime_not_at_once() {
        let tokens = AudienceTokens::default();
        tokens.store("apim", entry(key(1, "r1"), 1_100, 100));
        // A 300 s margin would make a 100 s token stale the moment it arrives.
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_040, 0, Some(300))
                .is_some()
        );
        assert!(
            tokens
                .cached("apim", &key(1, "r1"), 1_051, 0, Some(300))
                .is_none()
        );
    }
}
