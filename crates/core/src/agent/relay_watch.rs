//! With `[provider.exchange] method = "relay"`: the relay's event stream for the signed-in clinician's
//! CIS2 session, so that a central sign-out (back-channel logout at the relay) signs them out here.

use super::machine::Input;
use super::timers::LIFECYCLE_TICK;
use super::{Agent, Inner};
use crate::oidc::relay::RelayClient;
use std::time::Duration;

/// The reason every client is given when CIS2's back-channel logout reaches the agent.
pub const ENDED_AT_CIS2: &str =
    "the Care Identity session was ended centrally (signed out elsewhere or by an administrator)";

/// The longest wait between attempts to reopen the relay's event stream.
pub(super) const RELAY_RETRY_MAX: Duration = Duration::from_secs(60);

/// While someone is signed in, keeps the relay's event stream for their CIS2 session (`sid`) open and
/// signs them out when the relay reports the session ended. Reconnects with backoff; follows hand-overs.
pub(super) async fn watch_relay_logout(weak: std::sync::Weak<Inner>, relay: RelayClient) {
    let mut retry = Duration::from_secs(1);
    let mut told_no_ticket = None;
    loop {
        let watched = {
            let Some(inner) = weak.upgrade() else { return };
            let agent = Agent { inner };
            // Both read in one state, so a hand-over cannot pair one clinician's sid with the next
            // one's generation.
            let (generation, ids) = {
                let core = agent.core();
                let ids = core.state.active().and_then(|a| {
                    let s = &a.tokens;
                    Some((s.sid.clone()?, s.sub.clone(), s.events_ticket.clone()))
                });
                (core.state.generation, ids)
            };
            match ids {
                Some((sid, sub, Some(ticket))) => Some((sid, sub, ticket, generation)),
                Some((_, _, None)) => {
                    if told_no_ticket != Some(generation) {
                        told_no_ticket = Some(generation);
                        tracing::warn!(
                            "the relay gave no event-stream ticket for this session (a relay older than this agent?): \
                             a central sign-out will not reach this PC until the next sign-in"
                        );
                    }
                    None
                }
                None => None,
            }
        };
        let Some((sid, sub, ticket, generation)) = watched else {
            tokio::time::sleep(LIFECYCLE_TICK).await;
            continue;
        };
        let session_changed = {
            let weak = weak.clone();
            async move {
                loop {
                    tokio::time::sleep(LIFECYCLE_TICK).await;
                    let current = weak.upgrade().map(|inner| Agent { inner }.generation());
                    if current != Some(generation) {
                        return;
                    }
                }
            }
        };
        let opened = std::sync::atomic::AtomicBool::new(false);
        tokio::select! {
            ended = relay.wait_for_logout(&sid, &sub, &ticket, || opened.store(true, std::sync::atomic::Ordering::Relaxed)) => {
                if opened.load(std::sync::atomic::Ordering::Relaxed) {
                    retry = Duration::from_secs(1);
                }
                match ended {
                    Ok(()) => {
                        let Some(inner) = weak.upgrade() else { return };
                        // CIS2 has already ended the session there: nothing to revoke or end remotely.
                        Agent { inner }.apply(Input::EndedElsewhere {
                            generation,
                            reason: ENDED_AT_CIS2.into(),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_secs = retry.as_secs(), "the relay's logout events are not reaching the agent; retrying");
                        let jitter = Duration::from_millis(rand::random::<u64>() % 500);
                        tokio::time::sleep(retry + jitter).await;
                        retry = (retry * 2).min(RELAY_RETRY_MAX);
                    }
                }
            }
            () = session_changed => {}
        }
    }
}
