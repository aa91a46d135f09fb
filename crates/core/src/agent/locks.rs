//! Locks: an OS signal, inactivity or a smartcard taken out locks the session (tokens and identity
//! withheld, API Platform tokens dropped, the lock saved so a restart keeps it); the same clinician
//! signing in, or the same card put back (`same_card_unlocks`), lifts it. The rules are
//! `machine::step`'s; this is where the signals come in. The smartcard watcher's events arrive on a
//! channel: the watcher knows nothing of the agent.

use super::machine::{Input, LockReason, Refusal};
use super::{ActivityAnswer, Agent, AgentError};
use crate::smartcard::{Card, CardEvent};

impl Agent {
    /// Applies the smartcard watcher's events, in order, for as long as it sends them.
    pub fn follow_cards(&self, mut cards: tokio::sync::mpsc::UnboundedReceiver<CardEvent>) {
        let agent = self.clone();
        tokio::spawn(async move {
            while let Some(event) = cards.recv().await {
                match event {
                    CardEvent::Inserted(card) => agent.card_inserted(card).await,
                    CardEvent::Removed(card) => agent.card_removed(card).await,
                }
            }
        });
    }

    /// `Err(Locked)` with the reason and how to unlock, while the session is locked.
    pub fn check_unlocked(&self) -> Result<(), AgentError> {
        match self.core().state.unlocked() {
            Err(refusal @ Refusal::Locked { .. }) => Err(self.refusal_error(&refusal)),
            _ => Ok(()),
        }
    }

    /// A smartcard went into a reader. The card the session was locked for, back while the session is
    /// still valid, unlocks it (`same_card_unlocks`); a different card ends the locked session.
    pub async fn card_inserted(&self, card: Card) {
        let now = self.inner.clock.now();
        self.apply(Input::CardInserted { card, now });
    }

    /// A smartcard left its reader. If it is the card this session was signed in with, apply
    /// `on_card_removal`.
    pub async fn card_removed(&self, card: Card) {
        self.apply(Input::CardRemoved { card });
    }

    /// The `activity` method: the clinician is working in the calling program. The inactivity clock
    /// was started again by the policy check that let the call in; a locked session stays locked.
    pub fn activity(&self) -> Result<ActivityAnswer, AgentError> {
        let last = {
            let core = self.core();
            let active = core
                .state
                .unlocked()
                .map_err(|refusal| self.refusal_error(&refusal))?;
            active.last_activity
        };
        let policy = &self.inner.config.session;
        let action = policy.inactivity_action;
        Ok(ActivityAnswer {
            inactivity_secs: policy.inactivity_secs,
            inactivity_action: action.as_str(),
            acts_at: (action != crate::config::InactivityAction::None)
                .then(|| last + policy.inactivity_secs),
        })
    }

    /// Locks the session (a workstation signal, or `reason` in words): tokens and identity are
    /// withheld until the same clinician signs in again.
    pub fn lock(&self, reason: impl Into<LockReason>) {
        self.apply(Input::Lock {
            reason: reason.into(),
        });
    }

    /// Changes at every lock (and every change of person): an answer read under one count is not
    /// delivered under another.
    pub fn lock_count(&self) -> u64 {
        self.core().state.epoch
    }

    /// Whether putting the same smartcard back would unlock the current lock.
    pub fn card_would_unlock(&self) -> bool {
        self.core().state.lock().is_some_and(LockReason::by_card)
            && self.inner.rules.same_card_unlocks
    }
}
