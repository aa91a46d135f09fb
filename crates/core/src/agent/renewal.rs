//! The session's token: served from memory while it lasts, else renewed with the refresh token —
//! single-flight (one refresh at a time, waiters take its token), saved before the old refresh token is
//! dropped, dropped if the clinician changed meanwhile. After provider failures the background renewal
//! backs off (1 s doubling to 60 s, with jitter); a client's request reaches the provider at most once
//! a second.

use super::machine::{Caller, Input, Refreshed, Refusal};
use super::session::refused;
use super::test_hooks::crash_point;
use super::{
    Agent, AgentError, BadParamsReason, NotSignedInReason, SignInFailedReason, TokenAnswer,
    TokenRequest, UnreachableReason,
};
use crate::oidc::rp::{SignInError, SignedIn};
use rand::Rng;

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
            return Err(AgentError::BadParams(BadParamsReason::NoDownScopedTokens));
        }
        self.renew(request.min_valid_secs.unwrap_or(0), Caller::Client)
            .await
    }

    /// The token, renewed first when it would not last `min_valid` seconds (or is inside the refresh
    /// margin) and a refresh token is held. Single-flight; whether the provider may be asked (the
    /// background renewal backs off after provider failures, a client's request tries again at most
    /// once a second) and what its answer does to the session are `machine::step`'s.
    pub(super) async fn renew(
        &self,
        min_valid: u64,
        caller: Caller,
    ) -> Result<TokenAnswer, AgentError> {
        if let Some(answer) = self.cached_answer(min_valid, true)? {
            return Ok(answer);
        }
        let installs_before = self.core().state.installs;
        // Single-flight: one refresh at a time. Whoever waited takes the token the refresh produced
        // if it lasts what they asked for; the margin only drives renewal ahead of need, and judging
        // a fresh token by it would refresh again for every waiter when tokens live shorter.
        let _guard = self.inner.refresh_lock.lock().await;
        let refreshed_meanwhile = self.core().state.installs != installs_before;
        if let Some(answer) = self.cached_answer(min_valid, !refreshed_meanwhile)? {
            return Ok(answer);
        }
        let now = self.inner.clock.now();
        let (current, installed_at, generation, last_error, effects) = {
            let mut core = self.core();
            let active = core
                .state
                .unlocked()
                .map_err(|refusal| self.refusal_error(&refusal))?;
            let current = active.tokens.clone();
            let installed_at = active.tokens_installed_at;
            let last_error = active.renewal.last_error.clone();
            let generation = core.state.generation;
            let effects = self.step_locked(&mut core, Input::RefreshStarting { caller, now });
            (current, installed_at, generation, last_error, effects)
        };
        let Some(refresh_token) = current.refresh_token.clone() else {
            return if current.expires_at > now + min_valid {
                Ok(answer_from(&current, installed_at))
            } else {
                Err(AgentError::NotSignedIn(NotSignedInReason::NoRefreshToken {
                    left_secs: current.expires_at.saturating_sub(now),
                    asked_secs: min_valid,
                }))
            };
        };
        // The provider's answer, or (`Err(Err(due_in))`) why it was not asked.
        let result: Result<SignedIn, Result<SignInError, u64>> = match refused(&effects) {
            Some(Refusal::RefreshNotDue { due_in }) => Err(Err(*due_in)),
            Some(refusal) => return Err(self.refusal_error(refusal)),
            None => self
                .inner
                .rp
                .refresh(&refresh_token, &current)
                .await
                .map_err(Ok),
        };
        match result {
            Ok(renewed) => {
                crash_point("after_refresh_answer");
                let answer = answer_from(&renewed, now);
                let expires_at = renewed.expires_at;
                // Saved before the old refresh token is dropped: a crash loses nothing. Dropped if
                // the clinician changed while the provider answered.
                let effects = self.apply(Input::RefreshFinished {
                    generation,
                    now,
                    outcome: Refreshed::Renewed(renewed),
                });
                if refused(&effects).is_some() {
                    return Err(AgentError::NotSignedIn(
                        NotSignedInReason::ChangedDuringRenewal,
                    ));
                }
                crash_point("after_refresh_saved");
                if expires_at <= now + min_valid {
                    return Err(AgentError::TokenTooShort {
                        asked_secs: min_valid,
                        lifetime_secs: expires_at.saturating_sub(now),
                    });
                }
                Ok(answer)
            }
            Err(Ok(err @ (SignInError::RefreshRefused(_) | SignInError::SubjectChanged))) => {
                self.apply(Input::RefreshFinished {
                    generation,
                    now,
                    outcome: Refreshed::Ended(format!("the provider ended the session: {err}")),
                });
                Err(AgentError::NotSignedIn(NotSignedInReason::Ended(err)))
            }
            Err(err) => {
                let (why, failure) = match err {
                    Ok(err) => {
                        self.apply(Input::RefreshFinished {
                            generation,
                            now,
                            outcome: Refreshed::Failed {
                                error: err.to_string(),
                                jitter_percent: rand::thread_rng().gen_range(80..120),
                            },
                        });
                        let why = err.to_string();
                        if err.is_outage() {
                            (
                                why,
                                AgentError::Unreachable(UnreachableReason::Renewal(err)),
                            )
                        } else {
                            (
                                why,
                                AgentError::SignInFailed(SignInFailedReason::Renewal(err)),
                            )
                        }
                    }
                    Err(due_in_secs) => (
                        format!(
                            "{}; the next attempt is due in {due_in_secs} s",
                            last_error.as_deref().unwrap_or_default()
                        ),
                        AgentError::Unreachable(UnreachableReason::RenewalBackingOff {
                            last_error,
                            due_in_secs,
                        }),
                    ),
                };
                // Anything else leaves the session as it was: serve what is still valid, else say why.
                if current.expires_at > now + min_valid {
                    tracing::warn!(error = %why, "refresh failed; serving the cached token");
                    Ok(answer_from(&current, installed_at))
                } else {
                    Err(failure)
                }
            }
        }
    }

    /// The current token if it lasts `min_valid` seconds, and, `with_margin`, past the renewal margin
    /// (`None`: a refresh is needed).
    fn cached_answer(
        &self,
        min_valid: u64,
        with_margin: bool,
    ) -> Result<Option<TokenAnswer>, AgentError> {
        let now = self.inner.clock.now();
        let core = self.core();
        let cached = core
            .state
            .cached_token(&self.inner.rules, now, min_valid, with_margin)
            .map_err(|refusal| self.refusal_error(&refusal))?;
        Ok(cached.map(|active| answer_from(&active.tokens, active.tokens_installed_at)))
    }
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
