//! The lifecycle timers: the absolute session limit, inactivity, renewal ahead of expiry (and of the
//! API Platform tokens in use), and the announced end of a session that cannot be renewed. One
//! `tick` at a given time does all of them (the rules are `machine::step`'s `Tick`); the agent runs it
//! every 250 ms with its clock.

use super::machine::{Caller, Effect, Input};
use super::{Agent, Inner};
use std::time::Duration;

impl Agent {
    /// The timers at `now` (the agent's clock's time): absolute limit, inactivity, renewal before
    /// expiry, and the end of a session that cannot be renewed (announced `expiring_notice_secs`
    /// ahead). The agent calls it every 250 ms unless started with [`Timers::Driven`](super::Timers),
    /// whose caller calls it instead.
    pub async fn tick(&self, now: u64) {
        let effects = self.apply(Input::Tick { now });
        if effects
            .iter()
            .any(|e| matches!(e, Effect::RenewInBackground))
            && let Err(e) = self.renew(0, Caller::Background).await
        {
            tracing::debug!(error = %e, "background renewal did not complete");
        }
        // Read again: a lock decided since (this tick's own for inactivity, or an OS signal meanwhile)
        // is not followed by a renewal of the locked session's API Platform tokens.
        if self.core().state.lock().is_none() {
            self.renew_audience_tokens().await;
        }
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
