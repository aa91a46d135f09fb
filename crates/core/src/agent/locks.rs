//! Locks: an OS signal, inactivity or a smartcard taken out locks the session (tokens and identity
//! withheld, API Platform tokens dropped, the lock saved so a restart keeps it); the same clinician
//! signing in, or the same card put back (`same_card_unlocks`), lifts it. The smartcard watcher's
//! events arrive here, on a channel: the watcher knows nothing of the agent.

use super::{ActivityAnswer, Agent, AgentError, Event};
use crate::config::SignalAction;
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
        // One lock at a time: status() takes session then life, so never hold life while taking session.
        let (locked, by_card) = {
            let life = self.life();
            (life.locked.clone(), life.locked_by_card)
        };
        match locked {
            Some(reason) if self.session().is_some() => Err(AgentError::Locked {
                reason,
                card_unlocks: by_card && self.inner.config.workstation.same_card_unlocks,
            }),
            _ => Ok(()),
        }
    }

    /// A smartcard went into a reader. The card the session was locked for, back while the session is
    /// still valid, unlocks it (`same_card_unlocks`); a different card ends the locked session.
    pub async fn card_inserted(&self, card: Card) {
        {
            let mut readers = self.readers();
            readers.present = Some(card.clone());
            readers.seen_any = true;
        }
        let session_valid = {
            let now = self.inner.clock.now();
            match self.session().as_ref() {
                None => return,
                Some(s) => s.expires_at > now || s.refresh_token.is_some(),
            }
        };
        let (bound, locked_by_card) = {
            let life = self.life();
            (life.card.clone(), life.locked_by_card)
        };
        if !locked_by_card {
            return;
        }
        match (&bound, &card) {
            (Some(Card::Known(bound)), Card::Known(inserted)) if bound == inserted => {
                if !self.inner.config.workstation.same_card_unlocks || !session_valid {
                    return;
                }
                let unlocked = {
                    let mut life = self.life();
                    let was = life.locked.take().is_some();
                    life.locked_by_card = false;
                    life.last_activity = self.inner.clock.now();
                    was
                };
                if unlocked {
                    self.save_lock_state();
                    tracing::info!("the same smartcard is back: session unlocked");
                    self.emit(Event::Unlocked);
                }
            }
            (Some(Card::Known(_)), Card::Known(_)) => {
                self.sign_out_for("another smartcard was inserted").await;
            }
            // Either card cannot be told apart from others: the lock stays until someone signs in.
            _ => {}
        }
    }

    /// A smartcard left its reader. If it is the card this session was signed in with, apply
    /// `on_card_removal`.
    pub async fn card_removed(&self, card: Card) {
        {
            let mut readers = self.readers();
            readers.seen_any = true;
            if readers.present.as_ref() == Some(&card) {
                readers.present = None;
            }
        }
        if self.session().is_none() {
            return;
        }
        let bound = self.life().card.clone();
        if bound.as_ref() != Some(&card) {
            return;
        }
        const REASON: &str = "the smartcard was removed";
        match self.inner.config.workstation.on_card_removal {
            SignalAction::Lock => self.lock_with(REASON, true),
            SignalAction::SignOut => self.sign_out_for(REASON).await,
            SignalAction::Ignore => {}
        }
    }

    /// The `activity` method: the clinician is working in the calling program. The inactivity clock
    /// was started again by the policy check that let the call in; a locked session stays locked.
    pub fn activity(&self) -> Result<ActivityAnswer, AgentError> {
        self.check_unlocked()?;
        if self.session().is_none() {
            return Err(AgentError::not_signed_in());
        }
        let policy = &self.inner.config.session;
        let action = policy.inactivity_action;
        let last = self.life().last_activity;
        Ok(ActivityAnswer {
            inactivity_secs: policy.inactivity_secs,
            inactivity_action: action.as_str(),
            acts_at: (action != crate::config::InactivityAction::None)
                .then(|| last + policy.inactivity_secs),
        })
    }

    /// Locks the session (inactivity, a workstation signal): tokens and identity are withheld until the
    /// same clinician signs in again.
    pub fn lock(&self, reason: &str) {
        self.lock_with(reason, false);
    }

    /// Every lock, whatever gave it: API Platform tokens are dropped (they are fetched again after the
    /// unlock), and `by_card` lets the same card unlock it.
    pub(super) fn lock_with(&self, reason: &str, by_card: bool) {
        if self.session().is_none() {
            return;
        }
        self.inner.audiences.clear();
        let mut life = self.life();
        if life.locked.is_none() {
            life.locked = Some(reason.to_string());
            life.locked_by_card = by_card;
            drop(life);
            self.inner
                .locks
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.save_lock_state();
            tracing::info!(reason, "session locked");
            self.emit(Event::Locked {
                reason: reason.to_string(),
            });
        }
    }

    /// How many times the session was locked; an answer read under one count is not delivered under
    /// another.
    pub fn lock_count(&self) -> u64 {
        self.inner.locks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether putting the same smartcard back would unlock the current lock.
    pub fn card_would_unlock(&self) -> bool {
        self.life().locked_by_card && self.inner.config.workstation.same_card_unlocks
    }
}
