//! API Platform tokens for `token` with `"audience"` (`[[provider.audiences]]`): the session's ID token
//! exchanged by the relay (RFC 8693; the platform key lives only there). Each token is cached for the
//! session it was exchanged for — the person, their CIS2 session and their selected role, since the
//! platform's token carries the role — and is never served for another: a sign-out, a hand-over or a
//! role change makes it stale, and lock and sign-out also forget it. Renewed before it gets within the
//! renewal margin of expiry — in the background by the agent's lifecycle tick while programs use it,
//! else on demand — one exchange at a time (single-flight: concurrent callers take the token the first
//! one fetched); a failed background renewal backs off as the session's does.

use super::{
    Agent, AgentError, BadParamsReason, NotSignedInReason, TokenAnswer, UnreachableReason,
};
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
    /// Served to a program since it was fetched. Only tokens in use are renewed in the background: one
    /// a program asked for once is not exchanged again and again for the rest of the session.
    served: bool,
    /// After a failed background renewal: none before this, and how many failed in a row.
    retry_at: u64,
    failures: u32,
}

impl Cached {
    fn new(session: SessionKey, token: Secret, now: u64, lifetime: u64, served: bool) -> Cached {
        Cached {
            session,
            token,
            expires_at: now + lifetime,
            lifetime,
            served,
            retry_at: 0,
            failures: 0,
        }
    }

    /// Seconds before expiry it is renewed: `margin`, at most half its lifetime (else a short-lived
    /// token would be stale the moment it arrives).
    fn renew_ahead(&self, margin: u64) -> u64 {
        margin.min(self.lifetime / 2)
    }
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
            Some(margin) => min_valid.max(entry.renew_ahead(margin)),
            None => min_valid,
        };
        if entry.expires_at <= now + needed {
            return None;
        }
        let entry = cache.get_mut(audience)?;
        entry.served = true;
        Some(answer_of(entry))
    }

    /// The audiences whose tokens are this session's, in use, inside their renewal margin and not
    /// waiting out a backoff: what the background renewal exchanges again.
    fn due(&self, session: &SessionKey, now: u64, margin: u64) -> Vec<String> {
        let mut due: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| {
                &e.session == session
                    && e.served
                    && now >= e.retry_at
                    && now + e.renew_ahead(margin) >= e.expires_at
            })
            .map(|(name, _)| name.clone())
            .collect();
        due.sort();
        due
    }

    /// A background renewal of `audience` failed: the next waits `backoff(failures)` seconds. The
    /// token held stays served while it lasts.
    fn failed(&self, audience: &str, now: u64, backoff: impl Fn(u32) -> u64) {
        if let Some(entry) = self.lock().get_mut(audience) {
            entry.retry_at = now + backoff(entry.failures);
            entry.failures = entry.failures.saturating_add(1);
        }
    }

    fn store(&self, audience: &str, entry: Cached) {
        self.lock().insert(audience.to_string(), entry);
    }
}

fn answer_of(entry: &Cached) -> TokenAnswer {
    TokenAnswer {
        access_token: entry.token.expose().to_string(),
        token_type: "Bearer",
        expires_at: entry.expires_at,
        lifetime_secs: Some(entry.lifetime),
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
            return Err(AgentError::UnknownAudience {
                asked: name.to_string(),
                served: configured.iter().map(|a| a.name.clone()).collect(),
            });
        };
        let margin = self.inner.config.session.refresh_margin_secs;
        let key = self.audience_session()?.0;
        let cache = &self.inner.audiences;
        if let Some(answer) =
            cache.cached(name, &key, self.inner.clock.now(), min_valid, Some(margin))
        {
            return Ok(answer);
        }
        let _flight = cache.flight.lock().await;
        let (key, id_token) = self.audience_session()?;
        // A caller that waited takes what the exchange before it fetched if it lasts what it asked.
        if let Some(answer) = cache.cached(name, &key, self.inner.clock.now(), min_valid, None) {
            return Ok(answer);
        }
        self.exchange_audience(name, &route.route, key, id_token, true)
            .await
    }

    /// The current session's key and ID token.
    fn audience_session(&self) -> Result<(SessionKey, Secret), AgentError> {
        let core = self.core();
        let session = &core
            .state
            .active()
            .ok_or_else(AgentError::not_signed_in)?
            .tokens;
        Ok((
            SessionKey::of(core.state.generation, session),
            session.id_token.clone(),
        ))
    }

    /// One exchange at the relay for the session `key` (the caller holds the flight), kept in the cache
    /// if the session is still `key`'s and unlocked when it returns; `served`: a program gets it now.
    async fn exchange_audience(
        &self,
        name: &str,
        route: &str,
        key: SessionKey,
        id_token: Secret,
        served: bool,
    ) -> Result<TokenAnswer, AgentError> {
        let Exchange::Relay(relay) = &self.inner.rp.settings.exchange else {
            // The config refuses audiences without the relay; kept for a clear answer regardless.
            return Err(AgentError::BadParams(BadParamsReason::AudienceNeedsRelay));
        };
        if id_token.expose().is_empty() {
            return Err(AgentError::NotSignedIn(NotSignedInReason::NoIdToken));
        }
        let (answer, _) = relay
            .exchange(&id_token, route)
            .await
            .map_err(|e| refused(name, e))?;
        let lifetime = answer.expires_in.max(1);
        let entry = Cached::new(
            key.clone(),
            answer.access_token.clone(),
            self.inner.clock.now(),
            lifetime,
            served,
        );
        let answer = answer_of(&entry);
        // A sign-out, lock or role change while the exchange ran: the token is not for the session now.
        if self
            .audience_session()
            .is_ok_and(|(now_key, _)| now_key == key)
            && self.check_unlocked().is_ok()
        {
            self.inner.audiences.store(name, entry);
            Ok(answer)
        } else {
            Err(AgentError::NotSignedIn(
                NotSignedInReason::ChangedDuringExchange,
            ))
        }
    }

    /// From the lifecycle tick, while the session is unlocked: exchanges again each token that programs
    /// use and that is inside its renewal margin, so a `token` call seldom waits for the relay. Skipped
    /// while a program's exchange runs (it renews); a failure backs off as the session's renewal does,
    /// and the token held is served meanwhile.
    pub(super) async fn renew_audience_tokens(&self) {
        let Ok((key, _)) = self.audience_session() else {
            return;
        };
        let margin = self.inner.config.session.refresh_margin_secs;
        let cache = &self.inner.audiences;
        for name in cache.due(&key, self.inner.clock.now(), margin) {
            let Some(route) = self
                .inner
                .config
                .provider
                .as_ref()
                .and_then(|p| p.audiences.iter().find(|a| a.name == name))
            else {
                continue;
            };
            let Ok(_flight) = cache.flight.try_lock() else {
                return;
            };
            let Ok((key, id_token)) = self.audience_session() else {
                return;
            };
            if !cache
                .due(&key, self.inner.clock.now(), margin)
                .contains(&name)
            {
                continue;
            }
            if let Err(e) = self
                .exchange_audience(&name, &route.route, key, id_token, false)
                .await
            {
                tracing::debug!(audience = %name, error = %e, "background renewal of an API Platform token did not complete");
                cache.failed(&name, self.inner.clock.now(), super::backoff_secs);
            }
        }
    }
}

/// The relay's refusal as the agent's answer, in words for whoever reads the EHR's log: what was
/// refused, by whom, and who can fix it. The relay's description never carries a token.
fn refused(name: &str, e: ProviderError) -> AgentError {
    let ProviderError::Status {
        status,
        oauth_error,
        description,
        ..
    } = &e
    else {
        return AgentError::Unreachable(UnreachableReason::AudienceToken {
            audience: name.to_string(),
            cause: e,
        });
    };
    // The relay's own words, without the OAuth code the agent already read.
    let reason = match (description.as_deref(), oauth_error.as_deref()) {
        (Some(d), Some(code)) => d
            .strip_prefix(code)
            .map_or(d, |d| d.trim_start_matches(": ")),
        (Some(d), None) => d,
        (None, _) => "no reason given",
    }
    .trim_end_matches('.')
    .to_string();
    let audience = name.to_string();
    match (*status, oauth_error.as_deref()) {
        (400, Some("invalid_grant")) => {
            AgentError::NotSignedIn(NotSignedInReason::IdTokenNotAccepted { audience, reason })
        }
        (502, Some("relay_misconfigured")) => {
            AgentError::Unreachable(UnreachableReason::RelayMisconfigured { audience, reason })
        }
        (400..500, _) => {
            AgentError::BadParams(BadParamsReason::RouteRefused { audience, cause: e })
        }
        _ => AgentError::Unreachable(UnreachableReason::AudienceToken { audience, cause: e }),
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
        Cached::new(
            session,
            Secret::new("apim-token"),
            expires_at - lifetime,
            lifetime,
            false,
        )
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

    #[test]
    fn tokens_in_use_are_renewed_in_the_background_inside_their_margin_and_back_off_after_failures()
    {
        let tokens = AudienceTokens::default();
        let session = key(1, "r1");
        // Both fetched at 1_000 for 600 s; a 60 s margin.
        tokens.store("apim", entry(session.clone(), 1_600, 600));
        tokens.store("pds", entry(session.clone(), 1_600, 600));
        // Fetched but not served since (a background renewal's result): never renewed again unasked.
        assert!(tokens.due(&session, 1_590, 60).is_empty());
        // Served: due once inside the margin, not before; the other is still left alone.
        assert!(
            tokens
                .cached("apim", &session, 1_100, 0, Some(60))
                .is_some()
        );
        assert!(tokens.due(&session, 1_539, 60).is_empty());
        assert_eq!(tokens.due(&session, 1_540, 60), vec!["apim"]);
        // Not for another session (a hand-over, a role change, a new sign-in).
        assert!(tokens.due(&key(2, "r1"), 1_540, 60).is_empty());
        assert!(tokens.due(&key(1, "r2"), 1_540, 60).is_empty());

        // Failures: nothing before each backoff has passed, and the waits grow.
        let backoff = |failures: u32| [1, 2, 4][failures as usize];
        tokens.failed("apim", 1_540, backoff);
        assert!(tokens.due(&session, 1_540, 60).is_empty());
        assert_eq!(tokens.due(&session, 1_541, 60), vec!["apim"]);
        tokens.failed("apim", 1_541, backoff);
        assert!(tokens.due(&session, 1_542, 60).is_empty());
        assert_eq!(tokens.due(&session, 1_543, 60), vec!["apim"]);
        tokens.failed("apim", 1_543, backoff);
        assert!(tokens.due(&session, 1_546, 60).is_empty());
        // Meanwhile the token held serves whoever needs less than it has left.
        assert!(tokens.cached("apim", &session, 1_546, 30, None).is_some());

        // Renewed: the new token starts afresh, with no backoff, and is renewed again once served.
        tokens.store(
            "apim",
            Cached::new(session.clone(), Secret::new("t2"), 1_547, 600, false),
        );
        assert!(tokens.due(&session, 2_100, 60).is_empty());
        assert!(
            tokens
                .cached("apim", &session, 1_600, 0, Some(60))
                .is_some()
        );
        assert!(tokens.due(&session, 2_086, 60).is_empty());
        assert_eq!(tokens.due(&session, 2_087, 60), vec!["apim"]);
        // A short-lived token is renewed at half its lifetime, as on demand.
        tokens.store(
            "pds",
            Cached::new(session.clone(), Secret::new("u2"), 2_000, 100, true),
        );
        assert!(tokens.due(&session, 2_049, 300).iter().all(|n| n != "pds"));
        assert!(tokens.due(&session, 2_050, 300).iter().any(|n| n == "pds"));
        // Cleared (lock, sign-out): nothing to renew.
        tokens.clear();
        assert!(tokens.due(&session, 2_100, 60).is_empty());
    }
}
