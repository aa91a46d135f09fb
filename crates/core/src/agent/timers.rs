//! The lifecycle timers: the absolute session limit, inactivity, renewal ahead of expiry (and of the
//! API Platform tokens in use), and the announced end of a session that cannot be renewed. One
//! `tick` at a given time does all of them; the agent runs it every 250 ms with its clock.

use super::renewal::Caller;
use super::{Agent, Event, Inner};
use std::time::Duration;

impl Agent {
    /// The timers at `now` (the agent's clock's time): absolute limit, inactivity, renewal before
    /// expiry, and the end of a session that cannot be renewed (announced `expiring_notice_secs`
    /// ahead). The agent calls it every 250 ms unless started with [`Timers::Driven`](super::Timers),
    /// whose caller calls it instead.
    pub async fn tick(&self, now: u64) {
        let policy = self.inner.config.session.clone();
        let Some((expires_at, renewable)) = self
            .session()
            .as_ref()
            .map(|s| (s.expires_at, s.refresh_token.is_some()))
        else {
            return;
        };
        let (signed_in_at, last_activity, locked, announced) = {
            let life = self.life();
            (
                life.signed_in_at,
                life.last_activity,
                life.locked.is_some(),
                life.expiring_announced,
            )
        };
        if now >= signed_in_at + policy.absolute_secs {
            self.end_session(format!(
                "the session reached its maximum length ({})",
                human_duration(policy.absolute_secs)
            ));
            return;
        }
        if !locked && now >= last_activity + policy.inactivity_secs {
            let reason = format!(
                "no program used the session for {}",
                human_duration(policy.inactivity_secs)
            );
            match policy.inactivity_action {
                crate::config::InactivityAction::Lock => self.lock(&reason),
                crate::config::InactivityAction::SignOut => {
                    self.end_session(reason);
                    return;
                }
                crate::config::InactivityAction::None => {}
            }
        }
        // Read again: a lock decided since the first read (this tick's own for inactivity, or an OS
        // signal meanwhile) must not be followed by a renewal of the locked session.
        let locked = self.life().locked.is_some();
        if renewable {
            if !locked
                && now + self.renewal_margin(expires_at) >= expires_at
                && let Err(e) = self.renew(0, Caller::Background).await
            {
                tracing::debug!(error = %e, "background renewal did not complete");
            }
        } else {
            if !announced && now + policy.expiring_notice_secs >= expires_at {
                self.life().expiring_announced = true;
                self.emit(Event::SessionExpiring { expires_at });
            }
            if now >= expires_at {
                self.end_session(
                    "the session expired and the provider gave no refresh token; sign in again"
                        .into(),
                );
            }
        }
        if !locked {
            self.renew_audience_tokens().await;
        }
    }
}

pub(super) fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s => format!("{} hours", s / 3600),
    }
}

/// How often the session's timers are checked.
pub(super) const LIFECYCLE_TICK: Duration = Duration::from_millis(250);

/// Runs the timers every [`LIFECYCLE_TICK`] until the agent is dropped.
pub(super) fn run_in_background(weak: std::sync::Weak<Inner>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LIFECYCLE_TICK).await;
            let Some(inner) = weak.upgrade() else { break };
            let agent = Agent { inner };
            agent.tick(agent.now()).await;
        }
    });
}
