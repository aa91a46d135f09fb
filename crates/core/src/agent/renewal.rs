//! The session's token: served from memory while it lasts, else renewed with the refresh token —
//! single-flight (one refresh at a time, waiters take its token), saved before the old refresh token is
//! dropped, dropped if the clinician changed meanwhile. After provider failures the background renewal
//! backs off (1 s doubling to 60 s, with jitter); a client's request reaches the provider at most once
//! a second.

use super::signin::role_differs;
use super::test_hooks::crash_point;
use super::{Agent, AgentError, Event, TokenAnswer, TokenRequest};
use crate::oidc::rp::{SignInError, SignedIn};

impl Agent {
    /// The access token, renewed first when it would not last `min_valid_secs` (or is inside the
    /// refresh margin) and a refresh token is held.
    pub async fn token(&self, request: TokenRequest) -> Result<TokenAnswer, AgentError> {
        self.check_unlocked()?;
        if let (Some(audience), None) = (&request.audience, &request.scope) {
            return self
                .audience_token(audience, request.min_valid_secs.unwrap_or(0))
                .await;
        }
        if request.audience.is_some() || request.scope.is_some() {
            return Err(AgentError::BadParams(
                "This provider does not issue down-scoped tokens: ask without audience and scope for the session's token.".into(),
            ));
        }
        self.renew(request.min_valid_secs.unwrap_or(0), Caller::Client)
            .await
    }

    /// The token, renewed first when it would not last `min_valid` seconds (or is inside the refresh
    /// margin) and a refresh token is held. Single-flight; the background renewal backs off after
    /// provider failures, a client's request tries the provider again at most once a second.
    pub(super) async fn renew(
        &self,
        min_valid: u64,
        caller: Caller,
    ) -> Result<TokenAnswer, AgentError> {
        if let Some(answer) = self.cached_token(min_valid, true)? {
            return Ok(answer);
        }
        let installs_before = self.life().installs;
        // Single-flight: one refresh at a time. Whoever waited takes the token the refresh produced
        // if it lasts what they asked for; the margin only drives renewal ahead of need, and judging
        // a fresh token by it would refresh again for every waiter when tokens live shorter.
        let _guard = self.inner.refresh_lock.lock().await;
        let refreshed_meanwhile = self.life().installs != installs_before;
        if let Some(answer) = self.cached_token(min_valid, !refreshed_meanwhile)? {
            return Ok(answer);
        }
        let generation = self.generation();
        let Some(current) = self.session().clone() else {
            return Err(AgentError::not_signed_in());
        };
        let now = self.inner.clock.now();
        let Some(refresh_token) = current.refresh_token.clone() else {
            return if current.expires_at > now + min_valid {
                Ok(answer_from(&current, self.life().tokens_installed_at))
            } else {
                Err(AgentError::NotSignedIn(if current.expires_at > now {
                    format!(
                        "The access token has only {} s left, fewer than the {min_valid} s asked, and the provider gave no refresh token to renew it: sign in again (cis2ctl login).",
                        current.expires_at - now
                    )
                } else {
                    "The session's access token has expired and the provider gave no refresh token: sign in again (cis2ctl login).".into()
                }))
            };
        };
        let next_attempt = {
            let mut life = self.life();
            let client_due = life.last_refresh_attempt + 1;
            let next_attempt = match caller {
                Caller::Background => life.backoff_until,
                Caller::Client => life.backoff_until.min(client_due),
            };
            if now >= next_attempt {
                life.last_refresh_attempt = now;
            }
            next_attempt
        };
        let result = if now < next_attempt {
            Err(None)
        } else {
            self.inner
                .rp
                .refresh(&refresh_token, &current)
                .await
                .map_err(Some)
        };
        match result {
            Ok(renewed) => {
                crash_point("after_refresh_answer");
                let answer = answer_from(&renewed, now);
                let role_before = current.user.clone();
                let renewed_user = renewed.user.clone();
                let expires_at = renewed.expires_at;
                // Saved before the old refresh token is dropped: a crash loses nothing. Dropped if
                // the clinician changed while the provider answered.
                if !self.install_if(renewed, false, Some(generation)) {
                    return Err(AgentError::NotSignedIn(
                        "The clinician signed in here changed while the token was being renewed; ask again.".into(),
                    ));
                }
                crash_point("after_refresh_saved");
                self.emit(Event::TokenRefreshed { expires_at });
                if role_differs(&role_before, &renewed_user) {
                    self.emit(Event::RoleChanged { user: renewed_user });
                }
                if expires_at <= now + min_valid {
                    return Err(AgentError::TokenTooShort {
                        asked_secs: min_valid,
                        lifetime_secs: expires_at.saturating_sub(now),
                    });
                }
                Ok(answer)
            }
            Err(Some(err @ (SignInError::RefreshRefused(_) | SignInError::SubjectChanged))) => {
                self.end_session_if(
                    format!("the provider ended the session: {err}"),
                    Some(generation),
                );
                Err(AgentError::NotSignedIn(format!(
                    "The session has ended: {err}. Sign in again."
                )))
            }
            Err(err) => {
                let why = match &err {
                    Some(err) => {
                        self.back_off(now, err.to_string());
                        err.to_string()
                    }
                    None => format!(
                        "{}; the next attempt is due in {} s",
                        self.life().last_refresh_error.clone().unwrap_or_default(),
                        next_attempt.saturating_sub(now)
                    ),
                };
                // Anything else leaves the session as it was: serve what is still valid, else say why.
                if current.expires_at > now + min_valid {
                    tracing::warn!(error = %why, "refresh failed; serving the cached token");
                    Ok(answer_from(&current, self.life().tokens_installed_at))
                } else if err.as_ref().is_none_or(SignInError::is_outage) {
                    Err(AgentError::Unreachable(format!(
                        "The token could not be renewed because the Care Identity Service could not be reached ({why}); the session is kept — try again shortly."
                    )))
                } else {
                    Err(AgentError::SignInFailed(format!(
                        "The token could not be renewed: {why}. The session is kept."
                    )))
                }
            }
        }
    }

    /// Exponential backoff with ±20% jitter, 1 s doubling to at most 60 s.
    pub(super) fn back_off(&self, now: u64, error: String) {
        let mut life = self.life();
        life.last_refresh_error = Some(error);
        life.backoff_until = now + backoff_secs(life.backoff_step);
        life.backoff_step += 1;
    }

    /// The current token if it lasts `min_valid` seconds, and, `with_margin`, past the renewal margin.
    pub(super) fn cached_token(
        &self,
        min_valid: u64,
        with_margin: bool,
    ) -> Result<Option<TokenAnswer>, AgentError> {
        let now = self.inner.clock.now();
        let session = self.session();
        let Some(current) = session.as_ref() else {
            return Err(AgentError::not_signed_in());
        };
        let needed = if with_margin {
            min_valid.max(self.renewal_margin(current.expires_at))
        } else {
            min_valid
        };
        Ok((current.expires_at > now + needed)
            .then(|| answer_from(current, self.life().tokens_installed_at)))
    }

    /// How long before `expires_at` the token is renewed ahead of need: `refresh_margin_secs`, or half
    /// the token's lifetime when the provider's tokens live shorter than twice that (else every token
    /// would be inside the margin from the moment it arrives, and renewed on every tick).
    pub(super) fn renewal_margin(&self, expires_at: u64) -> u64 {
        let margin = self.inner.config.session.refresh_margin_secs;
        match self.life().tokens_installed_at {
            0 => margin,
            installed_at => margin.min(expires_at.saturating_sub(installed_at) / 2),
        }
    }
}

/// Who wants the token renewed: the background renewal obeys the backoff; a client's request may reach
/// the provider once a second whatever the backoff, so the first request after an outage finds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    Client,
    Background,
}

/// The wait after `failures` failed background renewals in a row: 1 s doubling to at most 60 s, each
/// ±20% (the session's, and the API Platform tokens' in `audience`).
pub(super) fn backoff_secs(failures: u32) -> u64 {
    use rand::Rng;
    let base = 1u64 << failures.min(6);
    let jittered = (base as f64 * rand::thread_rng().gen_range(0.8..1.2)).round() as u64;
    jittered.clamp(1, 60)
}

pub(super) fn answer_from(session: &SignedIn, installed_at: u64) -> TokenAnswer {
    TokenAnswer {
        access_token: session.access_token.expose().to_string(),
        token_type: "Bearer",
        expires_at: session.expires_at,
        lifetime_secs: (installed_at != 0).then(|| session.expires_at.saturating_sub(installed_at)),
    }
}
