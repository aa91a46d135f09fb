//! What the desktop app shows and does, as plain data and one call per action, so that the Tauri shell
//! is glue only: the window's [`View`], the client-approval prompts ([`Approvals`], the agent's
//! [`Approver`] for `client_policy = "ask"`), and the actions behind its buttons. Everything here runs
//! without a window and is tested without one.

use crate::agent::{Agent, AgentError, SessionState};
use crate::peer::Peer;
use crate::policy::{Answer, Approver, Remembered};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// How long a prompt waits for the clinician before the program is refused.
pub const APPROVAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Prompts waiting at once; more are refused without asking (a program cannot bury the window).
pub const MAX_PENDING_APPROVALS: usize = 5;

/// Everything the window draws.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct View {
    pub state: SessionState,
    /// Not NHS CIS2: the window shows the sandbox banner.
    pub sandbox: bool,
    pub environment: String,
    pub uid: Option<String>,
    pub name: Option<String>,
    pub role: Option<RoleView>,
    pub roles: Vec<RoleView>,
    /// "Smartcard", "Passkey", "Windows Hello"… from the sign-in's `amr`.
    pub authenticated_with: Option<String>,
    /// "AAL3", "AAL2"… from the sign-in's `acr`.
    pub assurance: Option<String>,
    /// Until the session ends at the latest (the absolute limit, or an unrenewable token's expiry).
    pub seconds_left: Option<u64>,
    /// The session cannot be renewed and ends soon.
    pub expiring: bool,
    pub locked_reason: Option<String>,
    /// Putting the same smartcard back would unlock it.
    pub card_unlocks: bool,
    pub approvals: Vec<ApprovalView>,
    /// Set by the window after a failed action; the core leaves it empty.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoleView {
    pub id: String,
    pub name: String,
    pub org_code: String,
    pub org_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApprovalView {
    pub id: u64,
    /// The executable's file name: what a person recognises. Never a name the client sent.
    pub program: String,
    pub path: String,
    /// Said over the buttons when the program is an interpreter: allowing it may allow far more
    /// than the person thinks.
    pub warning: Option<String>,
}

/// The warning for an interpreter's prompt: "Always allow" is remembered for the interpreter's hash,
/// so it lets in every script it runs, not only this one.
fn interpreter_warning(peer: &Peer) -> Option<String> {
    if !peer.interpreter {
        return None;
    }
    let program = peer.program_name().unwrap_or_else(|| "This program".into());
    Some(match &peer.script {
        Some(script) => format!(
            "{program} is an interpreter, running {}. It runs whatever script it is given: \
             \"Always allow\" lets in every script {program} runs, not only this one. Allow once \
             unless you are sure.",
            script.display()
        ),
        None => format!(
            "{program} is an interpreter and runs whatever it is given: allowing it lets in \
             every script it runs. Allow once unless you are sure."
        ),
    })
}

/// `amr` values as a person would name them.
pub fn authenticator_name(amr: &[String]) -> Option<String> {
    let names: Vec<&str> = amr
        .iter()
        .filter_map(|m| match m.to_ascii_lowercase().as_str() {
            // CIS2's own name for a smartcard, and the RFC 8176 ones.
            "n3_smartcard" | "sc" | "smartcard" | "hwk" => Some("Smartcard"),
            "whfb" | "windows_hello" => Some("Windows Hello"),
            "fido2" | "fido" | "security_key" => Some("Security key"),
            "passkey" | "webauthn" => Some("Passkey"),
            "totp" | "otp" | "authenticator_app" => Some("Authenticator app"),
            "nhsmail" => Some("NHSmail"),
            "face" | "fpt" => Some("Biometrics"),
            "pwd" => Some("Password"),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then(|| {
        let mut names = names;
        names.dedup();
        names.join(" and ")
    })
}

/// The authentication assurance level as NHS staff know it: from CIS2's
/// `authentication_assurance_level` ("3" → AAL3), else from `acr` (`AAL3_ANY` → AAL3).
fn assurance_level(assurance: &crate::oidc::claims::Assurance) -> Option<String> {
    if let Some(level) = &assurance.authentication_assurance_level {
        return Some(format!("AAL{level}"));
    }
    let acr = assurance.acr.as_deref()?;
    Some(if acr.starts_with("AAL2_OR_AAL3") {
        "AAL2 or AAL3".to_string()
    } else {
        acr.split('_').next().unwrap_or(acr).to_string()
    })
}

struct Pending {
    view: ApprovalView,
    answer: oneshot::Sender<Answer>,
}

/// The prompts waiting for the clinician. The agent asks through [`Approver`]; the window lists them
/// and answers. Unanswered prompts are refused after [`APPROVAL_TIMEOUT`].
#[derive(Default)]
pub struct Approvals {
    pending: Mutex<Vec<Pending>>,
    next_id: Mutex<u64>,
    changed: Notify,
}

impl Approvals {
    pub fn list(&self) -> Vec<ApprovalView> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| p.view.clone())
            .collect()
    }

    /// Answers prompt `id`; false if it is no longer waiting.
    pub fn answer(&self, id: u64, answer: Answer) -> bool {
        let found = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let at = pending.iter().position(|p| p.view.id == id);
            at.map(|i| pending.remove(i))
        };
        self.changed.notify_waiters();
        match found {
            Some(p) => p.answer.send(answer).is_ok(),
            None => false,
        }
    }

    /// Resolves when a prompt is added or answered.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[async_trait::async_trait]
impl Approver for Approvals {
    async fn ask(&self, peer: &Peer) -> Answer {
        let path = peer
            .exe
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "an unidentified program".into());
        let program = peer.program_name().unwrap_or_else(|| "A program".into());
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() >= MAX_PENDING_APPROVALS {
                tracing::warn!(path = ?path, "too many programs waiting for approval; refused without asking");
                return Answer::Deny;
            }
            pending.push(Pending {
                view: ApprovalView {
                    id,
                    program,
                    path,
                    warning: interpreter_warning(peer),
                },
                answer: tx,
            });
        }
        self.changed.notify_waiters();
        // Answered, timed out, or abandoned (the request's own time limit dropped this future): the
        // prompt goes in every case.
        let _remove = RemoveOnDrop {
            approvals: self,
            id,
        };
        let answer = tokio::time::timeout(APPROVAL_TIMEOUT, rx).await;
        match answer {
            Ok(Ok(answer)) => answer,
            _ => Answer::Deny,
        }
    }
}

struct RemoveOnDrop<'a> {
    approvals: &'a Approvals,
    id: u64,
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        self.approvals
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.view.id != self.id);
        self.approvals.changed.notify_waiters();
    }
}

/// The agent as the window uses it.
#[derive(Clone)]
pub struct Desktop {
    pub agent: Agent,
    pub approvals: Arc<Approvals>,
}

fn message(e: AgentError) -> String {
    e.to_string()
}

impl Desktop {
    pub fn view(&self) -> View {
        let status = self.agent.status();
        let now = self.agent.now();
        let user = status.user.as_ref();
        let role_view = |r: &crate::oidc::claims::Role| RoleView {
            id: r.id.clone(),
            name: r.name.clone(),
            org_code: r.org_code.clone(),
            org_name: r.org_name.clone(),
        };
        // None when nobody is signed in.
        let ends_at = match (self.agent.session_ends_at(), status.expires_at) {
            (Some(limit), Some(expires)) if !self.agent.renewable() => Some(limit.min(expires)),
            (limit, _) => limit,
        };
        View {
            state: status.state,
            sandbox: self.agent.is_sandbox(),
            environment: status.environment.clone(),
            uid: user.map(|u| u.uid.clone()),
            name: user.and_then(|u| u.name.clone()),
            role: user.and_then(|u| u.selected_role.as_ref()).map(role_view),
            roles: user
                .map(|u| u.roles.iter().map(role_view).collect())
                .unwrap_or_default(),
            authenticated_with: user.and_then(|u| authenticator_name(&u.assurance.amr)),
            assurance: user.and_then(|u| assurance_level(&u.assurance)),
            seconds_left: ends_at.map(|e| e.saturating_sub(now)),
            // Announced for an unrenewable token, or the absolute limit is near.
            expiring: self.agent.expiring()
                || ends_at.is_some_and(|e| {
                    e.saturating_sub(now) <= self.agent.config().session.expiring_notice_secs
                }),
            locked_reason: status.locked_reason.clone(),
            card_unlocks: self.agent.card_would_unlock(),
            approvals: self.approvals.list(),
            error: None,
        }
    }

    /// The window's sign-in button: a person at the keyboard (so a switch of clinician is refused
    /// unless the config allows it).
    pub async fn login(&self) -> Result<View, String> {
        self.agent
            .login_at_the_keyboard(None)
            .await
            .map_err(message)?;
        Ok(self.view())
    }

    pub fn cancel_login(&self) -> View {
        self.agent.cancel_sign_in();
        self.view()
    }

    pub async fn change_role(&self) -> Result<View, String> {
        self.agent.change_role().await.map_err(message)?;
        Ok(self.view())
    }

    pub async fn logout(&self) -> Result<View, String> {
        self.agent.logout().await.map_err(message)?;
        Ok(self.view())
    }

    /// `answer`: `allow-once`, `always-allow` or `deny` (the window's button ids).
    pub fn answer_approval(&self, id: u64, answer: &str) -> Result<View, String> {
        let answer = match answer {
            "allow-once" => Answer::AllowOnce,
            "always-allow" => Answer::AlwaysAllow,
            "deny" => Answer::Deny,
            other => return Err(format!("unknown answer {other:?}")),
        };
        if !self.approvals.answer(id, answer) {
            return Err(
                "That request is no longer waiting (the program gave up or it timed out).".into(),
            );
        }
        Ok(self.view())
    }

    pub fn remembered_programs(&self) -> Vec<Remembered> {
        self.agent.remembered_programs()
    }

    pub fn forget_program(&self, id: &str) -> Result<Vec<Remembered>, String> {
        match self.agent.forget_program(id) {
            Ok(true) => Ok(self.remembered_programs()),
            Ok(false) => Err(format!("No remembered program has the id {id}.")),
            Err(e) => Err(format!(
                "The list of remembered programs could not be changed: {e}"
            )),
        }
    }

    /// Calls `on_change` with a fresh view whenever the session or the prompts change (the shell
    /// repaints the window and the tray from it). Runs until the agent is gone.
    pub fn watch(&self, on_change: impl Fn(View) + Send + Sync + 'static) {
        let desktop = self.clone();
        let mut events = self.agent.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => {
                        if matches!(event, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                    () = desktop.approvals.changed() => {}
                }
                on_change(desktop.view());
            }
        });
    }
}

/// Tells the app when a view shows a new sign-in — someone signed in after no one was, or another
/// person or role than the window last showed — so that it opens the window then. On a shared
/// computer a sign-in swapped for someone else's (issue: login CSRF) must not go unseen. The first
/// view only sets the baseline: a session restored when the app starts is not a new sign-in.
#[derive(Debug, Default)]
pub struct NewSignIns {
    baseline_set: bool,
    shown: Option<(String, Option<String>)>,
}

impl NewSignIns {
    pub fn is_new(&mut self, view: &View) -> bool {
        let first = !std::mem::replace(&mut self.baseline_set, true);
        match view.state {
            SessionState::SignedIn => {
                let who = (
                    view.uid.clone().unwrap_or_default(),
                    view.role.as_ref().map(|r| r.id.clone()),
                );
                let changed = self.shown.as_ref() != Some(&who);
                self.shown = Some(who);
                changed && !first
            }
            SessionState::SignedOut => {
                self.shown = None;
                false
            }
            SessionState::SigningIn | SessionState::Locked => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_as(state: SessionState, uid: Option<&str>, role: Option<&str>) -> View {
        View {
            state,
            sandbox: true,
            environment: "sandbox".into(),
            uid: uid.map(str::to_owned),
            name: None,
            role: role.map(|id| RoleView {
                id: id.into(),
                name: "Role".into(),
                org_code: "RX1".into(),
                org_name: None,
            }),
            roles: Vec::new(),
            authenticated_with: None,
            assurance: None,
            seconds_left: None,
            expiring: false,
            locked_reason: None,
            card_unlocks: false,
            approvals: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn the_window_opens_at_each_new_sign_in_and_not_for_a_restored_or_unlocked_one() {
        use SessionState::*;
        let mut watch = NewSignIns::default();
        // Restored at start: the baseline, not news.
        assert!(!watch.is_new(&view_as(SignedIn, Some("A"), Some("r1"))));
        assert!(!watch.is_new(&view_as(SignedIn, Some("A"), Some("r1"))));
        // Locked and unlocked by the same person: not news.
        assert!(!watch.is_new(&view_as(Locked, Some("A"), Some("r1"))));
        assert!(!watch.is_new(&view_as(SignedIn, Some("A"), Some("r1"))));
        // A role change is shown.
        assert!(!watch.is_new(&view_as(SigningIn, Some("A"), Some("r1"))));
        assert!(watch.is_new(&view_as(SignedIn, Some("A"), Some("r2"))));
        // Another person after a lock (a hand-over, or a swapped sign-in) is shown.
        assert!(!watch.is_new(&view_as(Locked, Some("A"), Some("r2"))));
        assert!(watch.is_new(&view_as(SignedIn, Some("B"), Some("r2"))));
        // Signed out, then the same person again: a new sign-in.
        assert!(!watch.is_new(&view_as(SignedOut, None, None)));
        assert!(watch.is_new(&view_as(SignedIn, Some("B"), Some("r2"))));
    }

    #[test]
    fn a_first_sign_in_after_starting_signed_out_is_shown() {
        let mut watch = NewSignIns::default();
        assert!(!watch.is_new(&view_as(SessionState::SignedOut, None, None)));
        assert!(watch.is_new(&view_as(SessionState::SignedIn, Some("A"), None)));
    }

    #[test]
    fn authenticators_are_named_as_people_say_them() {
        let names =
            |v: &[&str]| authenticator_name(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(names(&["N3_SMARTCARD"]).as_deref(), Some("Smartcard"));
        assert_eq!(names(&["PASSKEY"]).as_deref(), Some("Passkey"));
        assert_eq!(names(&["FIDO2"]).as_deref(), Some("Security key"));
        assert_eq!(names(&["WHFB"]).as_deref(), Some("Windows Hello"));
        assert_eq!(
            names(&["pwd", "TOTP"]).as_deref(),
            Some("Password and Authenticator app")
        );
        assert_eq!(names(&["unknown"]), None);
        let level = |aal: Option<&str>, acr: Option<&str>| {
            assurance_level(&crate::oidc::claims::Assurance {
                acr: acr.map(str::to_string),
                amr: Vec::new(),
                id_assurance_level: None,
                authentication_assurance_level: aal.map(str::to_string),
                auth_time: None,
            })
        };
        assert_eq!(
            level(Some("3"), Some("AAL2_OR_AAL3_ANY")).as_deref(),
            Some("AAL3")
        );
        assert_eq!(level(None, Some("AAL3_ANY")).as_deref(), Some("AAL3"));
        assert_eq!(
            level(None, Some("AAL2_OR_AAL3_ANY")).as_deref(),
            Some("AAL2 or AAL3")
        );
        assert_eq!(level(None, None), None);
    }

    #[test]
    fn an_interpreter_s_prompt_warns_that_always_allow_covers_every_script() {
        let mut peer = Peer {
            exe: Some("/usr/bin/python3.11".into()),
            interpreter: true,
            script: Some("/opt/ward/ward.py".into()),
            ..Peer::default()
        };
        let warning = interpreter_warning(&peer).expect("an interpreter is warned about");
        assert!(
            warning.contains("python3.11 is an interpreter, running /opt/ward/ward.py")
                && warning.contains("lets in every script python3.11 runs"),
            "{warning}"
        );
        peer.script = None;
        assert!(
            interpreter_warning(&peer)
                .unwrap()
                .contains("every script it runs")
        );
    }

    #[tokio::test]
    async fn a_prompt_waits_for_its_answer_and_goes_away() {
        let approvals = Arc::new(Approvals::default());
        let peer = Peer {
            uid: 1000,
            pid: Some(42),
            exe: Some("/opt/ward-ehr/bin/ward-ehr".into()),
            sha256: Some("ab".repeat(32)),
            ..Peer::default()
        };
        let asking = {
            let approvals = approvals.clone();
            tokio::spawn(async move { approvals.ask(&peer).await })
        };
        while approvals.list().is_empty() {
            tokio::task::yield_now().await;
        }
        let listed = approvals.list();
        assert_eq!(listed[0].program, "ward-ehr");
        assert_eq!(listed[0].warning, None, "a native program needs no warning");
        assert_eq!(listed[0].path, "/opt/ward-ehr/bin/ward-ehr");
        assert!(
            !approvals.answer(listed[0].id + 1, Answer::AllowOnce),
            "no such prompt"
        );
        assert!(approvals.answer(listed[0].id, Answer::AlwaysAllow));
        assert_eq!(asking.await.unwrap(), Answer::AlwaysAllow);
        assert!(approvals.list().is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_prompt_goes_and_a_flood_is_refused_without_asking() {
        let approvals = Arc::new(Approvals::default());
        let peer = Peer {
            uid: 1000,
            pid: Some(7),
            exe: Some("/tmp/pest".into()),
            sha256: Some("aa".repeat(32)),
            ..Peer::default()
        };
        // A request that gives up (its task is cancelled) takes its prompt with it.
        let abandoned = {
            let (approvals, peer) = (approvals.clone(), peer.clone());
            tokio::spawn(async move { approvals.ask(&peer).await })
        };
        while approvals.list().is_empty() {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        let _ = abandoned.await;
        assert!(approvals.list().is_empty());
        // Only MAX_PENDING_APPROVALS wait; the next is refused at once.
        let waiting: Vec<_> = (0..MAX_PENDING_APPROVALS)
            .map(|_| {
                let (approvals, peer) = (approvals.clone(), peer.clone());
                tokio::spawn(async move { approvals.ask(&peer).await })
            })
            .collect();
        while approvals.list().len() < MAX_PENDING_APPROVALS {
            tokio::task::yield_now().await;
        }
        assert_eq!(approvals.ask(&peer).await, Answer::Deny);
        assert_eq!(approvals.list().len(), MAX_PENDING_APPROVALS);
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_prompt_is_a_refusal() {
        let approvals = Approvals::default();
        let peer = Peer {
            uid: 1000,
            pid: None,
            exe: None,
            sha256: None,
            ..Peer::default()
        };
        assert_eq!(approvals.ask(&peer).await, Answer::Deny);
        assert!(approvals.list().is_empty());
    }
}
