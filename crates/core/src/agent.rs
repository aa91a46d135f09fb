//! The agent's public API, which both front ends and the IPC server call: start, status, login, whoami,
//! token, logout, and the event stream. One session object owns the state; concurrent `login` calls
//! share one browser flow, and concurrent `token` calls share one refresh (single-flight).

use crate::audit::{AuditLog, ClientInfo, Record};
use crate::browser::Browser;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ExchangeMethod, SigningAlg};
use crate::http::HttpClient;
use crate::oidc::claims::User;
use crate::oidc::discovery::Discovery;
use crate::oidc::exchange::ClientAuth;
use crate::oidc::rp::{ClientSettings, RelyingParty, SignInError, SignedIn};
use crate::peer::{Identifier, Peer};
use crate::policy::{self, Approver, Decisions, Grant, Verdict};
use crate::secret::Secret;
use cis2_jose::{Alg, SigningKey};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The sandbox's client registration at the embedded provider (shipped in cis2-mock-idp's clients.toml).
pub const SANDBOX_CLIENT_ID: &str = "100000000001.apps.national";

/// What a client is told went wrong. Each maps to one JSON-RPC error code of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotSignedIn(String),
    #[error("{0}")]
    SignInFailed(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    BadParams(String),
}

impl AgentError {
    pub fn code(&self) -> i64 {
        match self {
            AgentError::NotSignedIn(_) => -32001,
            AgentError::SignInFailed(_) => -32002,
            AgentError::NotAllowed(_) => -32003,
            AgentError::Locked(_) => -32004,
            AgentError::Unreachable(_) => -32005,
            AgentError::BadParams(_) => -32602,
        }
    }

    fn from_sign_in(err: SignInError) -> AgentError {
        if err.is_outage() {
            AgentError::Unreachable(format!(
                "The Care Identity Service could not be reached: {err}."
            ))
        } else {
            AgentError::SignInFailed(format!("Sign-in failed: {err}."))
        }
    }

    fn not_signed_in() -> AgentError {
        AgentError::NotSignedIn(
            "Nobody is signed in. Sign in first (cis2ctl login, or the agent's window).".into(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    SignedOut,
    SigningIn,
    SignedIn,
    Locked,
}

/// The `status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub state: SessionState,
    pub environment: String,
    pub user: Option<User>,
    pub expires_at: Option<u64>,
}

/// The `token` result.
#[derive(Debug, Clone, Serialize)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub min_valid_secs: Option<u64>,
    pub audience: Option<String>,
    pub scope: Option<String>,
}

/// A notification to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SignedIn { user: User },
    SignedOut { reason: String },
    TokenRefreshed { expires_at: u64 },
    RoleChanged { user: User },
    SessionExpiring { expires_at: u64 },
    Locked { reason: String },
    Unlocked,
}

/// How to build an agent.
pub struct AgentOptions {
    pub config: Config,
    pub browser: Browser,
    pub clock: SharedClock,
    /// Who answers `client_policy = "ask"` (the desktop app's prompt); `None` refuses.
    pub approver: Option<Arc<dyn Approver>>,
}

impl AgentOptions {
    pub fn new(config: Config, browser: Browser) -> AgentOptions {
        AgentOptions {
            config,
            browser,
            clock: Arc::new(SystemClock),
            approver: None,
        }
    }
}

/// Per-connection memory of a person's "Allow once".
#[derive(Debug, Default)]
pub struct ConnectionGrant {
    allowed_once: bool,
}

type Flight = watch::Receiver<Option<Result<Status, AgentError>>>;

struct Inner {
    environment: String,
    rp: RelyingParty,
    browser: Browser,
    clock: SharedClock,
    config: Config,
    session: Mutex<Option<SignedIn>>,
    login_flight: tokio::sync::Mutex<Option<Flight>>,
    refresh_lock: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Event>,
    change_role_lock: tokio::sync::Mutex<()>,
    identifier: Identifier,
    decisions: Decisions,
    audit: AuditLog,
    approver: Option<Arc<dyn Approver>>,
    data_dir: PathBuf,
    /// The embedded provider in sandbox mode; kept alive with the agent.
    _sandbox: Option<cis2_mock_idp::RunningProvider>,
}

/// The agent. Cheap to clone; every clone is the same agent.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("the sandbox provider could not start: {0}")]
    Sandbox(String),
}

fn client_auth(config: &Config) -> Result<ClientAuth, StartError> {
    let Some(provider) = &config.provider else {
        return Ok(ClientAuth::None);
    };
    let exchange = &provider.exchange;
    match exchange.method {
        ExchangeMethod::None => Ok(ClientAuth::None),
        ExchangeMethod::ClientSecretPost => {
            let name = exchange.secret_env.clone().unwrap_or_default();
            match std::env::var(&name) {
                Ok(secret) if !secret.is_empty() => Ok(ClientAuth::SecretPost(Secret::new(secret))),
                _ => Err(StartError::Config(format!(
                    "the client secret is read from the environment variable {name} ([provider.exchange] secret_env), but it is not set; set it before starting the agent"
                ))),
            }
        }
        ExchangeMethod::PrivateKeyJwt => {
            let path = exchange.key_file.clone().unwrap_or_default();
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| StartError::Config(format!("cannot read key_file {}: {e}", path.display())))?;
            let alg = match exchange.alg {
                SigningAlg::RS256 => Alg::RS256,
                SigningAlg::RS512 => Alg::RS512,
            };
            let key = SigningKey::from_pem(&pem, alg)
                .map_err(|e| StartError::Config(format!("key_file {}: {e}", path.display())))?;
            Ok(ClientAuth::PrivateKeyJwt(Box::new(key)))
        }
        ExchangeMethod::Relay => Err(StartError::Config(
            "[provider.exchange] method = \"relay\" is not available in this build yet (cis2-relay is still to come); \
             use private_key_jwt, client_secret_post or none for now"
                .into(),
        )),
    }
}

impl Agent {
    /// Builds the agent; in sandbox mode it first starts the embedded provider on loopback.
    pub async fn start(options: AgentOptions) -> Result<Agent, StartError> {
        let AgentOptions {
            config,
            browser,
            clock,
            approver,
        } = options;
        let data_dir = config
            .agent
            .data_dir
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        create_private_dir(&data_dir).map_err(|e| {
            StartError::Config(format!(
                "cannot use the data folder {}: {e}",
                data_dir.display()
            ))
        })?;
        let audit = AuditLog::open(&data_dir.join("audit.jsonl")).map_err(|e| {
            StartError::Config(format!(
                "cannot open the audit log in {}: {e}",
                data_dir.display()
            ))
        })?;
        let (issuer, client_id, settings_from, sandbox, ca_file) = if config.is_sandbox() {
            let running = cis2_mock_idp::start(cis2_mock_idp::Options::default())
                .await
                .map_err(|e| StartError::Sandbox(e.to_string()))?;
            (
                running.issuer.clone(),
                SANDBOX_CLIENT_ID.to_string(),
                None,
                Some(running),
                None,
            )
        } else {
            let provider = config
                .provider
                .clone()
                .ok_or_else(|| StartError::Config("the config has no [provider]".into()))?;
            (
                provider.issuer.clone(),
                provider.client_id.clone(),
                Some(provider.clone()),
                None,
                provider.ca_file.clone(),
            )
        };
        let settings = match &settings_from {
            Some(p) => ClientSettings {
                client_id,
                auth: client_auth(&config)?,
                scopes: p.scopes.clone(),
                acr_values: p.acr_values.clone(),
                prompt: p.prompt.clone(),
                max_age: p.max_age,
                redirect_ports: p.redirect_ports.clone(),
                login_timeout: Duration::from_secs(p.login_timeout_secs),
            },
            None => ClientSettings {
                client_id,
                auth: ClientAuth::None,
                scopes: crate::config::DEFAULT_SCOPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                acr_values: Some(crate::config::DEFAULT_ACR_VALUES.to_string()),
                prompt: Some(crate::config::DEFAULT_PROMPT.to_string()),
                max_age: Some(crate::config::DEFAULT_MAX_AGE),
                redirect_ports: Vec::new(),
                login_timeout: Duration::from_secs(crate::config::DEFAULT_LOGIN_TIMEOUT_SECS),
            },
        };
        let http = HttpClient::with_ca_file(ca_file.as_deref(), Duration::from_secs(15))
            .map_err(StartError::Config)?;
        let rp = RelyingParty {
            discovery: Discovery::new(issuer, http, clock.clone()),
            settings,
            clock: clock.clone(),
        };
        let (events, _) = broadcast::channel(256);
        Ok(Agent {
            inner: Arc::new(Inner {
                environment: config.environment.as_str().to_string(),
                rp,
                browser,
                clock,
                config,
                session: Mutex::new(None),
                login_flight: tokio::sync::Mutex::new(None),
                refresh_lock: tokio::sync::Mutex::new(()),
                events,
                change_role_lock: tokio::sync::Mutex::new(()),
                identifier: Identifier::default(),
                decisions: Decisions::new(data_dir.join("clients.json")),
                audit,
                approver,
                data_dir,
                _sandbox: sandbox,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn issuer(&self) -> &str {
        self.inner.rp.issuer()
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.data_dir
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.inner.audit
    }

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
        if method == "status" {
            return Ok(Grant {
                source: "status is answered for every program of this user".into(),
                methods: vec!["status".into()],
                audiences: Vec::new(),
                scopes: Vec::new(),
            });
        }
        let config = &self.inner.config;
        let verdict = policy::decide(config, &self.inner.decisions, peer);
        let grant = match verdict {
            Verdict::Allowed(grant) => grant,
            Verdict::Denied(why) => return Err(AgentError::NotAllowed(why)),
            Verdict::Ask if connection.allowed_once => Grant::everything("allowed once"),
            Verdict::Ask => match &self.inner.approver {
                None => {
                    return Err(AgentError::NotAllowed(format!(
                        "{} is not listed in [[clients]], and cis2-agentd has no one to ask (client_policy = \"ask\").{} Or set [agent] client_policy = \"allow\" to let every program of this user in.",
                        peer.describe(),
                        policy::how_to_list(config, peer)
                    )));
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
                        return Err(AgentError::NotAllowed(format!(
                            "The person signed in refused {}.",
                            peer.describe()
                        )));
                    }
                },
            },
        };
        if !grant.permits(method) {
            return Err(AgentError::NotAllowed(format!(
                "{} may not call {method} ({}: allows {}).",
                peer.describe(),
                grant.source,
                grant.methods.join(", ")
            )));
        }
        Ok(grant)
    }

    /// Records what a program asked for and how it ended (never a token).
    pub async fn audit(
        &self,
        peer: &Peer,
        method: &str,
        audience: Option<String>,
        scope: Option<String>,
        outcome: String,
    ) {
        let (uid, role_id) = match self.session().as_ref() {
            Some(s) => (
                Some(s.user.uid.clone()),
                s.user.selected_role.as_ref().map(|r| r.id.clone()),
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
            .await;
    }

    /// Re-authenticates with role selection (`changedrole`); the same person must come back.
    pub async fn change_role(&self) -> Result<User, AgentError> {
        let _one_at_a_time = self.inner.change_role_lock.lock().await;
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
            return Err(AgentError::SignInFailed(format!(
                "The role change was completed by another person ({}); the session of {} is kept. Sign out first to switch clinician.",
                renewed.user.uid, current.user.uid
            )));
        }
        let user = renewed.user.clone();
        *self.session() = Some(renewed);
        self.emit(Event::RoleChanged { user: user.clone() });
        Ok(user)
    }

    pub fn is_sandbox(&self) -> bool {
        self.inner.config.is_sandbox()
    }

    /// The embedded provider, in sandbox mode.
    pub fn sandbox_provider(&self) -> Option<&cis2_mock_idp::RunningProvider> {
        self.inner._sandbox.as_ref()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Option<SignedIn>> {
        self.inner.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }

    pub fn status(&self) -> Status {
        let session = self.session();
        let signing_in = self
            .inner
            .login_flight
            .try_lock()
            .map(|f| f.as_ref().is_some_and(|rx| rx.borrow().is_none()))
            .unwrap_or(true);
        match session.as_ref() {
            Some(s) => Status {
                state: SessionState::SignedIn,
                environment: self.inner.environment.clone(),
                user: Some(s.user.clone()),
                expires_at: Some(s.expires_at),
            },
            None => Status {
                state: if signing_in {
                    SessionState::SigningIn
                } else {
                    SessionState::SignedOut
                },
                environment: self.inner.environment.clone(),
                user: None,
                expires_at: None,
            },
        }
    }

    pub fn whoami(&self) -> Result<User, AgentError> {
        self.session()
            .as_ref()
            .map(|s| s.user.clone())
            .ok_or_else(AgentError::not_signed_in)
    }

    /// Signs in through the browser, or joins the sign-in already under way. Answers when it ends.
    pub async fn login(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
        if self.session().is_some() {
            return Ok(self.status());
        }
        let mut rx = {
            let mut flight = self.inner.login_flight.lock().await;
            match flight.as_ref() {
                Some(rx) if rx.borrow().is_none() => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    *flight = Some(rx.clone());
                    let agent = self.clone();
                    tokio::spawn(async move {
                        let result = agent.run_sign_in(timeout).await;
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let answer = rx
            .wait_for(|v| v.is_some())
            .await
            .map(|v| v.clone())
            .ok()
            .flatten();
        answer.unwrap_or_else(|| {
            Err(AgentError::SignInFailed(
                "The sign-in was interrupted.".into(),
            ))
        })
    }

    async fn run_sign_in(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
        let result = self
            .inner
            .rp
            .sign_in(&self.inner.browser, timeout, &[], &[])
            .await;
        match result {
            Ok(signed_in) => {
                if let Some(t) = signed_in.callback_to_done {
                    tracing::info!(
                        uid = %signed_in.user.uid,
                        agent_ms = (t.saturating_sub(signed_in.provider_time)).as_secs_f64() * 1000.0,
                        provider_ms = signed_in.provider_time.as_secs_f64() * 1000.0,
                        "signed in"
                    );
                }
                let user = signed_in.user.clone();
                *self.session() = Some(signed_in);
                self.emit(Event::SignedIn { user });
                Ok(self.status())
            }
            Err(err) => {
                tracing::warn!(error = %err, "sign-in failed");
                Err(AgentError::from_sign_in(err))
            }
        }
    }

    /// The access token, renewed first when it would not last `min_valid_secs` (or is inside the
    /// refresh margin) and a refresh token is held.
    pub async fn token(&self, request: TokenRequest) -> Result<TokenAnswer, AgentError> {
        if request.audience.is_some() || request.scope.is_some() {
            return Err(AgentError::BadParams(
                "This provider does not issue down-scoped tokens: ask without audience and scope for the session's token.".into(),
            ));
        }
        let min_valid = request.min_valid_secs.unwrap_or(0);
        let margin = self.inner.config.session.refresh_margin_secs.max(min_valid);
        if let Some(answer) = self.cached_token(margin)? {
            return Ok(answer);
        }
        // Single-flight: one refresh at a time; whoever waited re-checks before refreshing again.
        let _guard = self.inner.refresh_lock.lock().await;
        if let Some(answer) = self.cached_token(margin)? {
            return Ok(answer);
        }
        let Some(current) = self.session().clone() else {
            return Err(AgentError::not_signed_in());
        };
        let now = self.inner.clock.now();
        let Some(refresh_token) = current.refresh_token.clone() else {
            return if current.expires_at > now + min_valid {
                Ok(answer_from(&current))
            } else {
                Err(AgentError::NotSignedIn(if current.expires_at > now {
                    format!(
                        "The access token has only {} s left, fewer than the {min_valid} s asked, and the provider gave no refresh token to renew it: sign in again (cis2ctl login).",
                        current.expires_at - now
                    )
                } else {
                    "The session's access token has expired and the provider gave no refresh token: sign in again (cis2ctl login).".into()
                }))
            };
        };
        match self.inner.rp.refresh(&refresh_token, &current).await {
            Ok(renewed) => {
                let answer = answer_from(&renewed);
                let expires_at = renewed.expires_at;
                *self.session() = Some(renewed);
                self.emit(Event::TokenRefreshed { expires_at });
                if expires_at <= now + min_valid {
                    return Err(AgentError::BadParams(format!(
                        "min_valid_secs = {min_valid} is longer than the provider's tokens last ({} s); ask for less.",
                        expires_at.saturating_sub(now)
                    )));
                }
                Ok(answer)
            }
            Err(err @ (SignInError::RefreshRefused(_) | SignInError::SubjectChanged)) => {
                self.end_session(format!("the provider ended the session: {err}"));
                Err(AgentError::NotSignedIn(format!(
                    "The session has ended: {err}. Sign in again."
                )))
            }
            Err(err) => {
                // Anything else leaves the session as it was: serve what is still valid, else say why.
                if current.expires_at > now + min_valid {
                    tracing::warn!(error = %err, "refresh failed; serving the cached token");
                    Ok(answer_from(&current))
                } else if err.is_outage() {
                    Err(AgentError::Unreachable(format!(
                        "The token could not be renewed because the Care Identity Service could not be reached ({err}); the session is kept — try again shortly."
                    )))
                } else {
                    Err(AgentError::SignInFailed(format!(
                        "The token could not be renewed: {err}. The session is kept."
                    )))
                }
            }
        }
    }

    fn cached_token(&self, margin: u64) -> Result<Option<TokenAnswer>, AgentError> {
        let now = self.inner.clock.now();
        let session = self.session();
        let Some(current) = session.as_ref() else {
            return Err(AgentError::not_signed_in());
        };
        Ok((current.expires_at > now + margin).then(|| answer_from(current)))
    }

    fn end_session(&self, reason: String) -> Option<SignedIn> {
        let ended = self.session().take();
        if ended.is_some() {
            self.emit(Event::SignedOut { reason });
        }
        ended
    }

    /// Signs out here at once, then ends the session at the provider in the background (best effort:
    /// the clinician is signed out locally whatever the provider does).
    pub async fn logout(&self) -> Result<(), AgentError> {
        let Some(ended) = self.end_session("signed out".into()) else {
            return Ok(());
        };
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
        Ok(())
    }
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn answer_from(session: &SignedIn) -> TokenAnswer {
    TokenAnswer {
        access_token: session.access_token.expose().to_string(),
        token_type: "Bearer",
        expires_at: session.expires_at,
    }
}
