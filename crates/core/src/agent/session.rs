//! The shell around `machine::step`: [`Agent::apply`] feeds one input to the machine under the one
//! lock and carries out what it asks — the store written before the new state can be read, the clients
//! told in the order the steps were taken, the provider told in the background. Also what is read from
//! the state (`status`, `whoami`, the window's facts), restoring the saved session at start, and
//! signing out.

use super::machine::{self, Effect, Input, LockReason, Notice, Refusal, Snapshot, State};
use super::{Agent, AgentError, Core, Event, Status};
use crate::oidc::claims::User;
use crate::oidc::rp::SignedIn;
use crate::store::Stored;

impl Agent {
    /// Feeds `input` to the machine (see [`Agent::step_locked`]) and returns what it did.
    pub(super) fn apply(&self, input: Input<SignedIn>) -> Vec<Effect<SignedIn>> {
        let mut core = self.core();
        self.step_locked(&mut core, input)
    }

    /// One step of the machine, with the lock held by the caller. The store is written before the new
    /// state is in place (so the file never lags what an answer said), the clients are told under the
    /// lock (so events follow the steps' order), API Platform tokens are forgotten and the provider is
    /// told in the background. What is left (a refusal, a browser to open, a provider to call) is the
    /// caller's, among the effects returned.
    pub(super) fn step_locked(
        &self,
        core: &mut Core,
        input: Input<SignedIn>,
    ) -> Vec<Effect<SignedIn>> {
        let state = std::mem::take(&mut core.state);
        let (next, effects) = machine::step(&self.inner.rules, state, input);
        for effect in &effects {
            match effect {
                Effect::Save(snapshot) => {
                    if let Err(e) = self.inner.store.save(&stored_of(snapshot)) {
                        tracing::error!(error = %e, "the session could not be saved; it will not survive a restart");
                    }
                }
                Effect::ClearStore => {
                    if let Err(e) = self.inner.store.clear() {
                        tracing::error!(error = %e, "the saved session could not be removed");
                    }
                }
                Effect::ForgetAudienceTokens => self.inner.audiences.clear(),
                _ => {}
            }
        }
        core.state = next;
        for effect in &effects {
            match effect {
                Effect::Notify(notice) => {
                    if let Some(event) = event_of(notice, &core.state) {
                        self.emit(event);
                    }
                }
                Effect::EndAtProvider(ended) => self.end_at_provider_later(ended.clone()),
                Effect::AbortFlight => {
                    core.flight_answer = None;
                    if let Some(task) = core.flight_task.take() {
                        task.abort();
                    }
                }
                _ => {}
            }
        }
        effects
    }

    pub fn status(&self) -> Status {
        let store = self.inner.store.status();
        let core = self.core();
        self.status_of(&core.state, store)
    }

    /// `status`, read from the state.
    pub(super) fn status_of(
        &self,
        state: &State<SignedIn>,
        store: crate::store::StoreStatus,
    ) -> Status {
        Status {
            state: state.state(),
            environment: self.inner.environment.clone(),
            // While locked the clinician's identity is withheld, as whoami's is.
            user: state.unlocked().ok().map(|a| a.tokens.user.clone()),
            expires_at: state.active().map(|a| a.tokens.expires_at),
            locked_reason: state.lock().map(LockReason::to_string),
            store,
            smartcard_present: state
                .readers
                .seen_any
                .then_some(state.readers.present.is_some()),
        }
    }

    /// What a refusal of the machine's is, for a client.
    pub(super) fn refusal_error(&self, refusal: &Refusal) -> AgentError {
        match refusal {
            Refusal::Locked(reason) => AgentError::Locked {
                reason: reason.to_string(),
                card_unlocks: reason.by_card() && self.inner.rules.same_card_unlocks,
            },
            _ => AgentError::not_signed_in(),
        }
    }

    /// At start: the saved session, if its tokens are still valid or refreshable.
    pub(super) fn restore(&self) {
        let Some(stored) = self.inner.store.load() else {
            return;
        };
        let now = self.inner.clock.now();
        let mut core = self.core();
        self.step_locked(
            &mut core,
            Input::Restore {
                stored: Some(snapshot_of(stored)),
                now,
            },
        );
        if let Some(active) = core.state.active() {
            tracing::info!(uid = %active.tokens.user.uid, locked = core.state.lock().is_some(), "session restored from the store");
        }
    }

    pub fn whoami(&self) -> Result<User, AgentError> {
        let core = self.core();
        core.state
            .unlocked()
            .map(|a| a.tokens.user.clone())
            .map_err(|refusal| self.refusal_error(&refusal))
    }

    /// Whether the session holds a refresh token (it can be renewed without the browser).
    pub fn renewable(&self) -> bool {
        self.core()
            .state
            .active()
            .is_some_and(|a| a.tokens.refresh_token.is_some())
    }

    /// When the session ends at the latest (`absolute_secs` after the browser sign-in), if there is one.
    pub fn session_ends_at(&self) -> Option<u64> {
        let core = self.core();
        let active = core.state.active()?;
        Some(
            active
                .signed_in_at
                .saturating_add(self.inner.rules.absolute_secs),
        )
    }

    /// Whether the clients were told the session is about to end (`session_expiring`).
    pub fn expiring(&self) -> bool {
        self.core()
            .state
            .active()
            .is_some_and(|a| a.expiring_announced)
    }

    /// Signs out because of a workstation signal or policy (`reason` goes to every client); the
    /// session is ended at the provider in the background.
    pub async fn sign_out_for(&self, reason: &str) {
        self.apply(Input::Logout {
            reason: reason.to_string(),
        });
    }

    pub(super) fn end_at_provider_later(&self, ended: SignedIn) {
        let agent = self.clone();
        tokio::spawn(async move {
            let problems = agent
                .inner
                .rp
                .end_at_provider(
                    ended.refresh_token.as_ref(),
                    &ended.id_token,
                    agent.inner.config.session.end_session_at_provider,
                )
                .await;
            for problem in problems {
                tracing::warn!(%problem, "signed out locally; the provider side did not complete");
            }
        });
    }

    /// Signs out here at once, then ends the session at the provider in the background (best effort:
    /// the clinician is signed out locally whatever the provider does).
    pub async fn logout(&self) -> Result<(), AgentError> {
        self.sign_out_for("signed out").await;
        Ok(())
    }
}

/// The event a notice is, with the user of the state after the step.
fn event_of(notice: &Notice, state: &State<SignedIn>) -> Option<Event> {
    let user = || state.active().map(|a| a.tokens.user.clone());
    Some(match notice {
        Notice::SignedIn => Event::SignedIn { user: user()? },
        Notice::SignedOut { reason } => {
            tracing::info!(%reason, "signed out");
            Event::SignedOut {
                reason: reason.clone(),
            }
        }
        Notice::TokenRefreshed { expires_at } => Event::TokenRefreshed {
            expires_at: *expires_at,
        },
        Notice::RoleChanged => Event::RoleChanged { user: user()? },
        Notice::SessionExpiring { expires_at } => Event::SessionExpiring {
            expires_at: *expires_at,
        },
        Notice::Locked { reason } => {
            tracing::info!(%reason, "session locked");
            Event::Locked {
                reason: reason.to_string(),
            }
        }
        Notice::Unlocked => {
            tracing::info!("session unlocked");
            Event::Unlocked
        }
    })
}

/// What the store keeps of a snapshot. The file's format is unchanged: the lock's reason in the words
/// clients are told, and whether it came from the smartcard.
fn stored_of(snapshot: &Snapshot<SignedIn>) -> Stored {
    let mut stored = Stored::from_session(&snapshot.tokens, snapshot.signed_in_at);
    stored.locked = snapshot.lock.as_ref().map(LockReason::to_string);
    stored.locked_by_card = snapshot.lock.as_ref().is_some_and(LockReason::by_card);
    stored.card = snapshot.card.clone();
    stored
}

/// The snapshot a store holds. Whether a lock came from the smartcard is read from its words (the
/// only card locks ever saved are "the smartcard was removed" and the restart's), so `locked_by_card`
/// is written for older agents but not needed to read.
fn snapshot_of(stored: Stored) -> Snapshot<SignedIn> {
    let lock = stored.locked.as_deref().map(LockReason::from_words);
    let card = stored.card.clone();
    let (tokens, signed_in_at) = stored.into_session();
    Snapshot {
        tokens,
        signed_in_at,
        lock,
        card,
    }
}

/// The first refusal among `effects`.
pub(super) fn refused<T>(effects: &[Effect<T>]) -> Option<&Refusal> {
    effects.iter().find_map(|e| match e {
        Effect::Refused(refusal) => Some(refusal),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session as an agent before `LockReason` saved it, with its lock in words.
    fn saved_by_an_older_agent(locked: Option<&str>, locked_by_card: bool) -> Stored {
        Stored {
            locked: locked.map(String::from),
            locked_by_card,
            card: Some(crate::smartcard::Card::Known("card".into())),
            ..crate::store::sample("access")
        }
    }

    #[test]
    fn a_saved_lock_reads_back_as_the_same_reason_and_is_saved_in_the_same_words() {
        for (words, by_card, reason) in [
            ("the workstation was locked", false, LockReason::Workstation),
            ("the smartcard was removed", true, LockReason::CardRemoved),
            (machine::RESTART_LOCK, true, LockReason::Restarted),
            (
                "no program used the session for 15 minutes",
                false,
                LockReason::Other("no program used the session for 15 minutes".into()),
            ),
        ] {
            let snapshot = snapshot_of(saved_by_an_older_agent(Some(words), by_card));
            assert_eq!(snapshot.lock.as_ref(), Some(&reason), "{words}");
            assert_eq!(snapshot.signed_in_at, 7);
            // Saved again: the same words and card flag an older agent reads.
            let again = stored_of(&snapshot);
            assert_eq!(again.locked.as_deref(), Some(words));
            assert_eq!(again.locked_by_card, by_card, "{words}");
            assert_eq!(again.card, snapshot.card);
        }
        let unlocked = snapshot_of(saved_by_an_older_agent(None, false));
        assert_eq!(unlocked.lock, None);
        assert_eq!(stored_of(&unlocked).locked, None);
    }
}
