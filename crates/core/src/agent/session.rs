//! The session's lifecycle: what `status` says, installing tokens (saved before they are swapped in),
//! restoring the saved session at start, saving the lock state, and ending the session (here at once,
//! at the provider in the background). Changes of person bump the generation under the session lock.

use super::signin::flight_running;
use super::{Agent, AgentError, Event, Life, SessionState, Status};
use crate::config::SignalAction;
use crate::oidc::claims::User;
use crate::oidc::rp::SignedIn;
use crate::store::Stored;

impl Agent {
    pub fn status(&self) -> Status {
        // The flight's lock is held only for moments; if it is held now, the flight is said to be
        // under way only when nobody is signed in (a sign-in is then the likely reason).
        let under_way = self
            .inner
            .login_flight
            .try_lock()
            .ok()
            .map(|flight| flight.as_ref().is_some_and(flight_running));
        self.status_with(under_way)
    }

    /// The status a flight answers with as it ends (it is still under way until it has answered).
    pub(super) fn settled_status(&self) -> Status {
        self.status_with(Some(false))
    }

    /// `signing_in`: whether a flight is under way (`None`: cannot tell this moment).
    pub(super) fn status_with(&self, signing_in: Option<bool>) -> Status {
        let session = self.session();
        let locked = self.life().locked.clone();
        let signing_in = signing_in.unwrap_or(session.is_none());
        // A locked session stays locked until the sign-in that unlocks it succeeds; a signed-in one
        // is signing_in while it re-authenticates (role change, re-authentication).
        let state = match (session.as_ref(), &locked) {
            (Some(_), Some(_)) => SessionState::Locked,
            _ if signing_in => SessionState::SigningIn,
            (Some(_), None) => SessionState::SignedIn,
            (None, _) => SessionState::SignedOut,
        };
        Status {
            state,
            environment: self.inner.environment.clone(),
            // While locked the clinician's identity is withheld, as whoami's is.
            user: session
                .as_ref()
                .filter(|_| locked.is_none())
                .map(|s| s.user.clone()),
            expires_at: session.as_ref().map(|s| s.expires_at),
            locked_reason: session.as_ref().and(locked),
            store: self.inner.store.status(),
            smartcard_present: {
                let readers = self.readers();
                readers.seen_any.then_some(readers.present.is_some())
            },
        }
    }

    pub(super) fn install(&self, session: SignedIn, fresh_authentication: bool) {
        self.install_if(session, fresh_authentication, None);
    }

    /// Installs `session` unless the person behind the session changed since `expected` (a refresh
    /// that finished after a sign-out or another clinician's sign-in is dropped). Saving and swapping
    /// happen under the session lock, so two saves never interleave and the file matches memory.
    pub(super) fn install_if(
        &self,
        session: SignedIn,
        fresh_authentication: bool,
        expected: Option<u64>,
    ) -> bool {
        let now = self.inner.clock.now();
        let signed_in_at = if fresh_authentication {
            now
        } else {
            self.life().signed_in_at
        };
        let present_card = self.readers().present.clone();
        {
            let mut current = self.session();
            if expected.is_some_and(|g| g != self.generation()) {
                return false;
            }
            let mut stored = Stored::from_session(&session, signed_in_at);
            if fresh_authentication {
                stored.card = present_card.clone();
            } else {
                let life = self.life();
                stored.locked = life.locked.clone();
                stored.locked_by_card = life.locked_by_card;
                stored.card = life.card.clone();
            }
            if let Err(e) = self.inner.store.save(&stored) {
                tracing::error!(error = %e, "the session could not be saved; it will not survive a restart");
            }
            *current = Some(session);
            if fresh_authentication {
                self.next_generation();
            }
        }
        let mut life = self.life();
        life.signed_in_at = signed_in_at;
        life.last_activity = life.last_activity.max(now);
        if fresh_authentication {
            life.last_activity = now;
            life.locked = None;
            life.locked_by_card = false;
            life.card = present_card;
        }
        life.expiring_announced = false;
        life.backoff_until = 0;
        life.backoff_step = 0;
        life.last_refresh_error = None;
        life.tokens_installed_at = now;
        life.installs += 1;
        true
    }

    /// At start: the saved session, if its tokens are still valid or refreshable.
    pub(super) fn restore(&self) {
        let Some(stored) = self.inner.store.load() else {
            return;
        };
        let now = self.inner.clock.now();
        if stored.expires_at <= now && stored.refresh_token.is_none() {
            let _ = self.inner.store.clear();
            return;
        }
        let (locked, locked_by_card, card) = (
            stored.locked.clone(),
            stored.locked_by_card,
            stored.card.clone(),
        );
        let (session, signed_in_at) = stored.into_session();
        tracing::info!(uid = %session.user.uid, locked = locked.is_some(), "session restored from the store");
        *self.session() = Some(session);
        let mut life = self.life();
        life.signed_in_at = signed_in_at;
        life.last_activity = now;
        life.locked = locked;
        life.locked_by_card = locked_by_card;
        // Signed in with a smartcard: after a restart the agent cannot know the card stayed in, so the
        // session waits, locked, until the card reader reports that same card (or a sign-in).
        if card.is_some()
            && life.locked.is_none()
            && self.inner.config.workstation.on_card_removal != SignalAction::Ignore
        {
            life.locked = Some(
                "the agent restarted; the smartcard the clinician signed in with must be in the reader"
                    .into(),
            );
            life.locked_by_card = true;
        }
        life.card = card;
    }

    /// Saves the current session with its lock state (after a lock or an unlock).
    pub(super) fn save_lock_state(&self) {
        let session = self.session();
        let Some(current) = session.as_ref() else {
            return;
        };
        let life = self.life();
        let mut stored = Stored::from_session(current, life.signed_in_at);
        stored.locked = life.locked.clone();
        stored.locked_by_card = life.locked_by_card;
        stored.card = life.card.clone();
        drop(life);
        if let Err(e) = self.inner.store.save(&stored) {
            tracing::error!(error = %e, "the lock could not be saved; a restart would not keep it");
        }
    }

    pub fn whoami(&self) -> Result<User, AgentError> {
        self.check_unlocked()?;
        self.session()
            .as_ref()
            .map(|s| s.user.clone())
            .ok_or_else(AgentError::not_signed_in)
    }

    /// Whether the session holds a refresh token (it can be renewed without the browser).
    pub fn renewable(&self) -> bool {
        self.session()
            .as_ref()
            .is_some_and(|s| s.refresh_token.is_some())
    }

    /// When the session ends at the latest (`absolute_secs` after the browser sign-in), if there is one.
    pub fn session_ends_at(&self) -> Option<u64> {
        self.session().as_ref()?;
        let life = self.life();
        Some(
            life.signed_in_at
                .saturating_add(self.inner.config.session.absolute_secs),
        )
    }

    /// Whether the clients were told the session is about to end (`session_expiring`).
    pub fn expiring(&self) -> bool {
        self.life().expiring_announced
    }

    pub(super) fn end_session(&self, reason: String) -> Option<SignedIn> {
        self.end_session_if(reason, None)
    }

    /// Ends the session unless the person behind it changed since `expected`.
    pub(super) fn end_session_if(&self, reason: String, expected: Option<u64>) -> Option<SignedIn> {
        let ended = {
            let mut current = self.session();
            if expected.is_some_and(|g| g != self.generation()) {
                return None;
            }
            let ended = current.take();
            if ended.is_some() {
                self.next_generation();
            }
            self.inner.audiences.clear();
            if let Err(e) = self.inner.store.clear() {
                tracing::error!(error = %e, "the saved session could not be removed");
            }
            ended
        };
        *self.life() = Life::default();
        // A finished sign-in's answer (the person's status) is kept for late joiners of that flight;
        // once they are signed out it must not linger.
        if let Ok(mut flight) = self.inner.login_flight.try_lock()
            && flight.as_ref().is_some_and(|rx| rx.borrow().is_some())
        {
            *flight = None;
        }
        if ended.is_some() {
            tracing::info!(%reason, "signed out");
            self.emit(Event::SignedOut { reason });
        }
        ended
    }

    /// Signs out because of a workstation signal or policy (`reason` goes to every client).
    pub async fn sign_out_for(&self, reason: &str) {
        if let Some(ended) = self.end_session(reason.to_string()) {
            self.end_at_provider_later(ended);
        }
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
