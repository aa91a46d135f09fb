//! Sign-in and role change through the browser, single-flight: one browser flow at a time, shared by
//! every caller through a `watch` channel (`status` says `signing_in` meanwhile); the window's Cancel
//! aborts it. Who may sign in over whom (`allow_user_switch`) and which events follow are decided here.

use super::{Agent, AgentError, Event, Status};
use crate::oidc::claims::User;
use std::time::Duration;
use tokio::sync::watch;

impl Agent {
    /// Re-authenticates with role selection (`changedrole`); the same person must come back. It is the
    /// sign-in flight: `status` says `signing_in` meanwhile, a `login` (or another role change) joins
    /// it rather than opening a second browser, and the window's Cancel stops it.
    pub async fn change_role(&self) -> Result<User, AgentError> {
        self.check_unlocked()?;
        if self.session().is_none() {
            return Err(AgentError::not_signed_in());
        }
        let status = self.sign_in_flight(FlightKind::ChangeRole, None).await?;
        status.user.ok_or_else(AgentError::not_signed_in)
    }

    pub(super) async fn run_change_role(&self) -> Result<Status, AgentError> {
        let generation = self.generation();
        let Some(current) = self.session().clone() else {
            return Err(AgentError::not_signed_in());
        };
        let renewed = self
            .inner
            .rp
            .sign_in(
                &self.inner.browser,
                None,
                &["changedrole"],
                &["selectedrole"],
            )
            .await
            .map_err(AgentError::from_sign_in)?;
        if renewed.sub != current.sub {
            return Err(AgentError::SignInFailed(
                "The role change was completed by another person; the current session is kept. Sign out first to switch clinician.".into(),
            ));
        }
        let user = renewed.user.clone();
        // A lock that came while the browser was open is lifted by this fresh authentication, as a
        // sign-in's is; the clients told `locked` must be told `unlocked`.
        let was_locked = self.life().locked.is_some();
        if !self.install_if(renewed, true, Some(generation)) {
            return Err(AgentError::NotSignedIn(
                "The session ended while the role was being changed; sign in again.".into(),
            ));
        }
        if was_locked {
            self.emit(Event::Unlocked);
        }
        // The same role picked again is no change: an EHR told `role_changed` would act for nothing.
        if role_differs(&current.user, &user) {
            self.emit(Event::RoleChanged { user });
        }
        Ok(self.settled_status())
    }

    /// The browser sign-in or role change under way, if any.
    pub(super) async fn flight_in_progress(&self) -> Option<Flight> {
        let flight = self.inner.login_flight.lock().await;
        flight.as_ref().filter(|rx| flight_running(rx)).cloned()
    }

    /// Signs in through the browser, or joins the sign-in already under way. Answers when it ends.
    pub async fn login(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
        if !self.needs_authentication() {
            // Signed in: a role change under way is joined, else the answer is the status.
            return match self.flight_in_progress().await {
                Some(flight) => wait_for_flight(flight).await,
                None => Ok(self.status()),
            };
        }
        self.sign_in_flight(FlightKind::SignIn, timeout).await
    }

    /// A person at the keyboard asked to sign in (cis2ctl login, the window's button). While someone
    /// is signed in that is a request to switch clinician: refused with what to do, unless
    /// `[workstation] allow_user_switch`, when a new sign-in runs and hands over if it is someone else.
    pub async fn login_at_the_keyboard(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Status, AgentError> {
        // A sign-in or role change under way is joined, whoever is signed in.
        if let Some(flight) = self.flight_in_progress().await {
            return wait_for_flight(flight).await;
        }
        let signed_in = {
            let session = self.session();
            session.as_ref().map(|s| {
                let user = &s.user;
                match &user.name {
                    Some(name) => format!("{name} ({})", user.uid),
                    None => user.uid.clone(),
                }
            })
        };
        match signed_in {
            // Locked or expiring sessions are not a switch: signing in is how the same clinician gets
            // back in, and someone else is refused after the browser step (run_sign_in).
            Some(who)
                if !self.needs_authentication()
                    && !self.inner.config.workstation.allow_user_switch =>
            {
                Err(AgentError::SignInFailed(format!(
                    "{who} is already signed in here. To sign in as someone else, sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true."
                )))
            }
            _ => self.sign_in_flight(FlightKind::SignIn, timeout).await,
        }
    }

    /// Joins the browser flow under way, whichever kind it is, or starts one of `kind`.
    pub(super) async fn sign_in_flight(
        &self,
        kind: FlightKind,
        timeout: Option<Duration>,
    ) -> Result<Status, AgentError> {
        let rx = {
            let mut flight = self.inner.login_flight.lock().await;
            match flight.as_ref() {
                Some(rx) if flight_running(rx) => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    *flight = Some(rx.clone());
                    let agent = self.clone();
                    let task = tokio::spawn(async move {
                        let result = match kind {
                            FlightKind::SignIn => agent.run_sign_in(timeout).await,
                            FlightKind::ChangeRole => agent.run_change_role().await,
                        };
                        let _ = tx.send(Some(result));
                    });
                    *self
                        .inner
                        .flight_task
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
                    rx
                }
            }
        };
        wait_for_flight(rx).await
    }

    /// Stops a browser sign-in under way (the window's Cancel): the loopback listener closes and
    /// every caller waiting on it is told the sign-in was cancelled. Whoever is signed in stays.
    pub fn cancel_sign_in(&self) -> bool {
        let task = self
            .inner
            .flight_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match task {
            Some(task) if !task.is_finished() => {
                task.abort();
                tracing::info!("sign-in cancelled");
                true
            }
            _ => false,
        }
    }

    /// Whether `login` must go to the browser: nobody signed in, the session locked, or a session that
    /// cannot be renewed and is about to end.
    pub(super) fn needs_authentication(&self) -> bool {
        let now = self.inner.clock.now();
        let notice = self.inner.config.session.expiring_notice_secs;
        match self.session().as_ref() {
            None => true,
            Some(s) => {
                self.life().locked.is_some()
                    || (s.refresh_token.is_none() && now + notice >= s.expires_at)
            }
        }
    }

    pub(super) async fn run_sign_in(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Status, AgentError> {
        let result = self
            .inner
            .rp
            .sign_in(&self.inner.browser, timeout, &[], &[])
            .await;
        let signed_in = match result {
            Ok(signed_in) => signed_in,
            Err(err) => {
                tracing::warn!(error = %err, "sign-in failed");
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
            .session()
            .as_ref()
            .map(|s| (s.sub.clone(), s.user.uid.clone(), s.user.clone()));
        let was_locked = self.life().locked.is_some();
        match previous {
            Some((sub, _, before)) if sub == signed_in.sub => {
                let user = signed_in.user.clone();
                self.install(signed_in, true);
                let role_changed = role_differs(&before, &user);
                if was_locked {
                    self.emit(Event::Unlocked);
                } else {
                    self.emit(Event::SignedIn { user: user.clone() });
                }
                // Unlocking (or re-authenticating) may pick another role at the provider: a client
                // still showing the old one must be told.
                if role_changed {
                    self.emit(Event::RoleChanged { user });
                }
            }
            Some((_, uid, _)) if !self.inner.config.workstation.allow_user_switch => {
                return Err(AgentError::SignInFailed(format!(
                    "{uid} is signed in here{}. They must sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.",
                    if was_locked {
                        " (the session is locked)"
                    } else {
                        ""
                    }
                )));
            }
            previous => {
                if previous.is_some() {
                    self.end_session("another clinician signed in".into());
                }
                let user = signed_in.user.clone();
                self.install(signed_in, true);
                self.emit(Event::SignedIn { user });
            }
        }
        Ok(self.settled_status())
    }
}

/// Whether two users hold different selected roles (compared by `person_roleid`, which names the role
/// assignment; a renamed organisation is not a role change).
pub(super) fn role_differs(before: &User, after: &User) -> bool {
    before.selected_role.as_ref().map(|r| &r.id) != after.selected_role.as_ref().map(|r| &r.id)
}

pub(super) type Flight = watch::Receiver<Option<Result<Status, AgentError>>>;

/// Whether the flight has not answered yet and its task still runs (a cancelled one drops its sender).
pub(super) fn flight_running(flight: &Flight) -> bool {
    flight.borrow().is_none() && flight.has_changed().is_ok()
}

/// The flight's outcome, once it ends.
pub(super) async fn wait_for_flight(mut flight: Flight) -> Result<Status, AgentError> {
    let answer = flight
        .wait_for(|v| v.is_some())
        .await
        .map(|v| v.clone())
        .ok()
        .flatten();
    answer.unwrap_or_else(|| {
        Err(AgentError::SignInFailed(
            "The sign-in was cancelled or interrupted; start it again.".into(),
        ))
    })
}

/// What a browser flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlightKind {
    SignIn,
    /// Re-authentication with role selection, for the clinician already signed in.
    ChangeRole,
}
