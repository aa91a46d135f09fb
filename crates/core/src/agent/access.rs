//! Access: the one place that decides whether a calling program may make a request (the policy, the
//! person's "Allow once", "Always allow" or "Deny", remembered by executable hash), whether it may see
//! who is signed in, and that records what it asked for in the audit log. A permitted request is
//! activity (the inactivity clock starts again); a refused one is not.

use super::{Agent, AgentError, ConnectionGrant, NotAllowedReason};
use crate::audit::{AuditError, ClientInfo, Record};
use crate::peer::Peer;
use crate::policy::{self, Grant, Verdict};

impl Agent {
    /// The peer, if its executable's hash is already known (no file is read).
    pub fn identify_cached(&self, uid: u32, pid: Option<i32>) -> Option<Peer> {
        self.inner.identifier.identify_cached(uid, pid)
    }

    /// Identifies a connected program from what the OS says of it.
    pub fn identify(&self, uid: u32, pid: Option<i32>) -> Peer {
        self.inner.identifier.identify(uid, pid)
    }

    /// May `peer` call `method`? Asks the approver when the policy says ask (once per connection for
    /// "Allow once"; "Always allow" and "Deny" are remembered by the executable's hash).
    pub async fn authorize(
        &self,
        peer: &Peer,
        method: &str,
        connection: &mut ConnectionGrant,
    ) -> Result<Grant, AgentError> {
        // Answered for everyone, and no sign of the clinician at work: not activity either.
        if policy::OPEN_METHODS.contains(&method) {
            return Ok(Grant {
                source: format!("{method} is answered for every program of this user"),
                methods: vec![method.into()],
                audiences: Vec::new(),
                scopes: Vec::new(),
            });
        }
        let config = &self.inner.config;
        let refused = |reason| AgentError::NotAllowed {
            program: peer.describe(),
            method: method.to_string(),
            reason,
        };
        let verdict = policy::decide(config, &self.inner.decisions, peer);
        let grant = match verdict {
            Verdict::Allowed(grant) => grant,
            Verdict::Denied(why) => return Err(refused(NotAllowedReason::Policy(why))),
            Verdict::Ask if connection.allowed_once => Grant::everything("allowed once"),
            Verdict::Ask => match &self.inner.approver {
                None => {
                    return Err(refused(NotAllowedReason::NoOneToAsk {
                        how_to_list: policy::how_to_list(config, peer),
                    }));
                }
                Some(approver) => match approver.ask(peer).await {
                    policy::Answer::AllowOnce => {
                        connection.allowed_once = true;
                        Grant::everything("allowed once by the person signed in")
                    }
                    policy::Answer::AlwaysAllow => {
                        if let Err(e) = self.inner.decisions.remember(peer, true) {
                            tracing::warn!(error = %e, "could not remember the decision");
                        }
                        Grant::everything("always allowed by the person signed in")
                    }
                    policy::Answer::Deny => {
                        if let Err(e) = self.inner.decisions.remember(peer, false) {
                            tracing::warn!(error = %e, "could not remember the decision");
                        }
                        return Err(refused(NotAllowedReason::RefusedByPerson));
                    }
                },
            },
        };
        if !grant.permits(method) {
            return Err(refused(NotAllowedReason::MethodNotGranted {
                source: grant.source,
                allowed: grant.methods,
            }));
        }
        // Only a permitted request is activity: a refused program cannot keep the session awake.
        self.touch();
        Ok(grant)
    }

    /// Whether `peer` may see who is signed in (`status` shows the user only to those programs).
    pub fn may_see_user(&self, peer: &Peer) -> bool {
        match policy::decide(&self.inner.config, &self.inner.decisions, peer) {
            Verdict::Allowed(grant) => grant.permits("whoami"),
            Verdict::Ask | Verdict::Denied(_) => false,
        }
    }

    /// Records what a program asked for and how it ended (never a token); returns once the record is
    /// in the log, so that the answer can wait for it.
    pub async fn audit(
        &self,
        peer: &Peer,
        method: &str,
        audience: Option<String>,
        scope: Option<String>,
        outcome: String,
    ) -> Result<(), AuditError> {
        let (uid, role_id) = match self.core().state.active() {
            Some(active) => (
                Some(active.tokens.user.uid.clone()),
                active
                    .tokens
                    .user
                    .selected_role
                    .as_ref()
                    .map(|r| r.id.clone()),
            ),
            None => (None, None),
        };
        self.inner
            .audit
            .record(Record {
                client: ClientInfo {
                    path: peer.exe.as_ref().map(|p| p.display().to_string()),
                    sha256: peer.sha256.clone(),
                    pid: peer.pid,
                },
                method: method.into(),
                audience,
                scope,
                uid,
                role_id,
                outcome,
            })
            .await
    }

    /// A client asked for something: the inactivity clock starts again.
    pub(super) fn touch(&self) {
        let now = self.inner.clock.now();
        self.apply(super::machine::Input::Activity { now });
    }

    /// The programs the clinician chose "Always allow" or "Deny" for.
    pub fn remembered_programs(&self) -> Vec<crate::policy::Remembered> {
        self.inner.decisions.list()
    }

    /// Forgets a remembered decision (by its short id or hash); the next request asks again.
    pub fn forget_program(&self, id: &str) -> std::io::Result<bool> {
        crate::policy::revoke(&self.data_dir().join("clients.json"), id)
    }
}
