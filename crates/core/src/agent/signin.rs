//! Sign-in and role change through the browser, single-flight: whether a browser flow starts, is
//! joined or is refused is `machine::step`'s decision (one flow at a time; `status` says `signing_in`
//! meanwhile); this module runs the flow in a task and shares its answer with every caller through a
//! `watch` channel, and the window's Cancel aborts it. The words of a refusal are written here.

use super::machine::{Effect, FlightKind, Input, Refusal};
use super::session::refused;
use super::{Agent, AgentError, Core, NotSignedInReason, SignInFailedReason, Status};
use crate::oidc::claims::User;
use crate::oidc::rp::SignedIn;
use std::time::Duration;
use tokio::sync::watch;

impl Agent {
    /// Re-authenticates with role selection (`changedrole`); the same person must come back. It is the
    /// sign-in flight: `status` says `signing_in` meanwhile, a `login` (or another role change) joins
    /// it rather than opening a second browser, and the window's Cancel stops it.
    pub async fn change_role(&self) -> Result<User, AgentError> {
        let flight = {
            let mut core = self.core();
            let effects = self.step_locked(&mut core, Input::ChangeRole);
            if let Some(refusal) = refused(&effects) {
                return Err(self.refusal_error(refusal));
            }
            self.flight_to_wait_for(&mut core, &effects, None)
        };
        let Some(flight) = flight else {
            return Err(AgentError::not_signed_in());
        };
        let status = wait_for_flight(flight).await?;
        status.user.ok_or_else(AgentError::not_signed_in)
    }

    /// Signs in through the browser, or joins the sign-in already under way. Answers when it ends.
    pub async fn login(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
        self.ask_to_sign_in(false, timeout).await
    }

    /// A person at the keyboard asked to sign in (cis2ctl login, the window's button). While someone
    /// is signed in that is a request to switch clinician: refused with what to do, unless
    /// `[workstation] allow_user_switch`, when a new sign-in runs and hands over if it is someone else.
    pub async fn login_at_the_keyboard(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Status, AgentError> {
        self.ask_to_sign_in(true, timeout).await
    }

    async fn ask_to_sign_in(
        &self,
        at_keyboard: bool,
        timeout: Option<Duration>,
    ) -> Result<Status, AgentError> {
        let now = self.inner.clock.now();
        let flight = {
            let mut core = self.core();
            let effects = self.step_locked(&mut core, Input::Login { at_keyboard, now });
            if refused(&effects).is_some() {
                let user = core.state.active().map(|a| &a.tokens.user);
                return Err(AgentError::SignInFailed(
                    SignInFailedReason::AlreadySignedIn {
                        uid: user.map(|u| u.uid.clone()).unwrap_or_default(),
                        name: user.and_then(|u| u.name.clone()),
                    },
                ));
            }
            self.flight_to_wait_for(&mut core, &effects, timeout)
        };
        match flight {
            Some(flight) => wait_for_flight(flight).await,
            // Signed in and nothing under way: the answer is the status.
            None => Ok(self.status()),
        }
    }

    /// The answer to wait for after a step: the flow the step opened (started here), else the one
    /// under way, if any.
    fn flight_to_wait_for(
        &self,
        core: &mut Core,
        effects: &[Effect<SignedIn>],
        timeout: Option<Duration>,
    ) -> Option<FlightAnswer> {
        let opened = effects.iter().find_map(|e| match e {
            Effect::OpenBrowser(kind) => Some(*kind),
            _ => None,
        });
        if let Some(kind) = opened {
            let (tx, rx) = watch::channel(None);
            let agent = self.clone();
            let task = tokio::spawn(async move {
                let result = match kind {
                    FlightKind::SignIn => agent.run_sign_in(timeout).await,
                    FlightKind::ChangeRole => agent.run_change_role().await,
                };
                let _ = tx.send(Some(result));
            });
            core.flight_answer = Some(rx.clone());
            core.flight_task = Some(task.abort_handle());
            return Some(rx);
        }
        core.state.flight.as_ref()?;
        let answer = core.flight_answer.clone();
        // A flow whose task ended without answering (it cannot be joined): forgotten, so the next
        // request starts afresh; this one is told it was interrupted.
        if answer.as_ref().is_none_or(|rx| rx.has_changed().is_err()) {
            self.step_locked(core, Input::CancelFlight);
        }
        Some(answer.unwrap_or_else(|| watch::channel(None).1))
    }

    /// Stops a browser sign-in under way (the window's Cancel): the loopback listener closes and
    /// every caller waiting on it is told the sign-in was cancelled. Whoever is signed in stays.
    pub fn cancel_sign_in(&self) -> bool {
        let effects = self.apply(Input::CancelFlight);
        let cancelled = effects.iter().any(|e| matches!(e, Effect::AbortFlight));
        if cancelled {
            tracing::info!("sign-in cancelled");
        }
        cancelled
    }

    /// The flow's result, given to the machine; the flow's plumbing goes with it. The status it
    /// answers with is read in the same step (the flow is no longer under way in it).
    fn finish_flight(&self, input: Input<SignedIn>) -> (Vec<Effect<SignedIn>>, Status) {
        let store = self.inner.store.status();
        let mut core = self.core();
        let effects = self.step_locked(&mut core, input);
        if core.state.flight.is_none() {
            core.flight_answer = None;
            core.flight_task = None;
        }
        let status = self.status_of(&core.state, store);
        (effects, status)
    }

    async fn run_change_role(&self) -> Result<Status, AgentError> {
        let result = self
            .inner
            .rp
            .sign_in(
                &self.inner.browser,
                None,
                &["changedrole"],
                &["selectedrole"],
            )
            .await;
        let now = self.inner.clock.now();
        let renewed = match result {
            Ok(renewed) => renewed,
            Err(err) => {
                self.finish_flight(Input::RoleChangeFinished { now, result: None });
                return Err(AgentError::from_sign_in(err));
            }
        };
        let (effects, status) = self.finish_flight(Input::RoleChangeFinished {
            now,
            result: Some(renewed),
        });
        match refused(&effects) {
            None => Ok(status),
            Some(Refusal::RoleChangeByOther) => Err(AgentError::SignInFailed(
                SignInFailedReason::RoleChangeByOther,
            )),
            Some(Refusal::SessionChanged) => Err(AgentError::NotSignedIn(
                NotSignedInReason::EndedDuringRoleChange,
            )),
            Some(_) => Err(interrupted()),
        }
    }

    async fn run_sign_in(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
        let result = self
            .inner
            .rp
            .sign_in(&self.inner.browser, timeout, &[], &[])
            .await;
        let now = self.inner.clock.now();
        let signed_in = match result {
            Ok(signed_in) => signed_in,
            Err(err) => {
                tracing::warn!(error = %err, "sign-in failed");
                self.finish_flight(Input::SignInFinished { now, result: None });
                return Err(AgentError::from_sign_in(err));
            }
        };
        if let Some(t) = signed_in.callback_to_done {
            tracing::info!(
                uid = %signed_in.user.uid,
                agent_ms = (t.saturating_sub(signed_in.provider_time)).as_secs_f64() * 1000.0,
                provider_ms = signed_in.provider_time.as_secs_f64() * 1000.0,
                "signed in"
            );
        }
        let previous = self
            .core()
            .state
            .active()
            .map(|a| a.tokens.user.uid.clone());
        let (effects, status) = self.finish_flight(Input::SignInFinished {
            now,
            result: Some(signed_in),
        });
        match refused(&effects) {
            None => Ok(status),
            Some(Refusal::OtherClinician { locked }) => Err(AgentError::SignInFailed(
                SignInFailedReason::OtherClinician {
                    uid: previous.unwrap_or_default(),
                    locked: *locked,
                },
            )),
            Some(_) => Err(interrupted()),
        }
    }
}

/// A browser flow's answer, shared by every caller waiting for it.
pub(super) type FlightAnswer = watch::Receiver<Option<Result<Status, AgentError>>>;

fn interrupted() -> AgentError {
    AgentError::SignInFailed(SignInFailedReason::Interrupted)
}

/// The flight's outcome, once it ends.
async fn wait_for_flight(mut flight: FlightAnswer) -> Result<Status, AgentError> {
    let answer = flight
        .wait_for(|v| v.is_some())
        .await
        .map(|v| v.clone())
        .ok()
        .flatten();
    answer.unwrap_or_else(|| Err(interrupted()))
}
