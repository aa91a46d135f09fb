//! The agent's public API, which both front ends and the IPC server call: start, status, login, whoami,
//! token, logout, and the event stream. One session object owns the state; concurrent `login` calls
//! share one browser flow, and concurrent `token` calls share one refresh (single-flight).

mod audience;
pub mod machine;

use crate::audit::{AuditError, AuditLog, AuditOptions, ClientInfo, Record};
use crate::browser::Browser;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ExchangeMethod, SignalAction, SigningAlg};
use crate::http::HttpClient;
use crate::oidc::claims::User;
use crate::oidc::discovery::Discovery;
use crate::oidc::exchange::ClientAuth;
use crate::oidc::relay::RelayClient;
use crate::oidc::rp::{ClientSettings, Exchange, RelyingParty, SignInError, SignedIn};
use crate::peer::{Identifier, Peer};
use crate::policy::{self, Approver, Decisions, Grant, Verdict};
use crate::secret::Secret;
use crate::smartcard::Card;
use crate::store::{KeyringStore, MemoryStore, StoreStatus, Stored, TokenStore};
use cis2_jose::{Alg, SigningKey};
use serde::Serialize;
use std::path::{Path, PathBuf};
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
    /// The provider's tokens do not last the `min_valid_secs` asked for: not a malformed request, so a
    /// client can tell it apart (and ask for less) by its code.
    #[error("{0}")]
    TokenTooShort(String),
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
            AgentError::TokenTooShort(_) => -32006,
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
    /// Why the session is locked, while it is.
    pub locked_reason: Option<String>,
    /// Where the session is kept (`keyring` or `memory`) and, when that is not what the config asked
    /// for, why.
    pub store: StoreStatus,
    /// Whether a smartcard is in a reader (`true`), none is (`false`), as far as the PC/SC watcher has
    /// seen; `null` before it has seen any card.
    pub smartcard_present: Option<bool>,
}

/// The `token` result. Its `Debug` does not show the token.
#[derive(Clone, Serialize)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_at: u64,
    /// How long the provider's tokens last, as this one was issued (its expiry less when it arrived);
    /// `None` for a token restored after a restart, whose arrival is not known.
    pub lifetime_secs: Option<u64>,
}

impl std::fmt::Debug for TokenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAnswer")
            .field("access_token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

/// The `activity` result: the inactivity rule, so a client can tell how often to report work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityAnswer {
    pub inactivity_secs: u64,
    /// `"lock"`, `"sign_out"` or `"none"`.
    pub inactivity_action: &'static str,
    /// When the session locks or ends if no program reports activity before then (`None` when the
    /// action is `"none"`).
    pub acts_at: Option<u64>,
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
    SignedIn {
        user: User,
    },
    SignedOut {
        reason: String,
    },
    TokenRefreshed {
        expires_at: u64,
    },
    RoleChanged {
        user: User,
    },
    SessionExpiring {
        expires_at: u64,
    },
    Locked {
        reason: String,
    },
    Unlocked,
    /// The agent is stopping (SIGTERM, Ctrl-C, the app quitting): the last event on every connection
    /// before it closes. `session_survives`: the session was saved where a restarted agent finds it.
    AgentStopping {
        session_survives: bool,
    },
}

/// Whether two users hold different selected roles (compared by `person_roleid`, which names the role
/// assignment; a renamed organisation is not a role change).
fn role_differs(before: &User, after: &User) -> bool {
    before.selected_role.as_ref().map(|r| &r.id) != after.selected_role.as_ref().map(|r| &r.id)
}

/// How to build an agent.
pub struct AgentOptions {
    pub config: Config,
    pub browser: Browser,
    pub clock: SharedClock,
    /// Who answers `client_policy = "ask"` (the desktop app's prompt); `None` refuses.
    pub approver: Option<Arc<dyn Approver>>,
    /// The token store; `None` builds the one the config asks for.
    pub store: Option<Arc<dyn TokenStore>>,
}

impl AgentOptions {
    pub fn new(config: Config, browser: Browser) -> AgentOptions {
        AgentOptions {
            config,
            browser,
            clock: Arc::new(SystemClock),
            approver: None,
            store: None,
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
    /// Bumped whenever the person behind the session changes (sign-in, sign-out): answers computed for
    /// an earlier generation are not delivered after the change is announced (see ipc::server).
    generation: std::sync::atomic::AtomicU64,
    /// Bumped at every lock, before it is announced: an answer read before a lock is not delivered
    /// after it (see ipc::server), as the generation does for a change of person.
    locks: std::sync::atomic::AtomicU64,
    login_flight: tokio::sync::Mutex<Option<Flight>>,
    /// The task running the current browser sign-in, so that it can be cancelled.
    flight_task: Mutex<Option<tokio::task::AbortHandle>>,
    refresh_lock: tokio::sync::Mutex<()>,
    /// API Platform tokens by audience (`token` with `audience`).
    audiences: audience::AudienceTokens,
    events: broadcast::Sender<Event>,
    identifier: Identifier,
    decisions: Decisions,
    audit: AuditLog,
    approver: Option<Arc<dyn Approver>>,
    data_dir: PathBuf,
    store: Arc<dyn TokenStore>,
    life: Mutex<Life>,
    /// What the PC/SC watcher last said.
    readers: Mutex<Readers>,
    /// Set when the agent stops: every connection sends its last events and closes; each holds a
    /// receiver until it has, so the stop can wait for them.
    stopping: watch::Sender<bool>,
    /// The embedded provider in sandbox mode; kept alive with the agent.
    _sandbox: Option<SandboxProvider>,
}

/// The session's timers and flags, beside the tokens.
#[derive(Debug, Default)]
struct Life {
    signed_in_at: u64,
    last_activity: u64,
    expiring_announced: bool,
    /// After a failed refresh, no background attempt before this (exponential backoff with jitter).
    backoff_until: u64,
    backoff_step: u32,
    /// When the provider was last asked to refresh: a client's request reaches it at most once a
    /// second, whatever the backoff.
    last_refresh_attempt: u64,
    /// When the current tokens were installed (0: restored from the store, age unknown).
    tokens_installed_at: u64,
    /// How many times tokens were installed: a caller that waited for a refresh sees one happened.
    installs: u64,
    last_refresh_error: Option<String>,
    locked: Option<String>,
    /// The smartcard that was in a reader when this person signed in: its removal is the
    /// `on_card_removal` signal, and only it can unlock a card lock.
    card: Option<Card>,
    /// The lock came from taking that card out (so putting it back may lift it).
    locked_by_card: bool,
}

/// The smartcard readers, as the PC/SC watcher reports them.
#[derive(Debug, Default)]
struct Readers {
    /// The card in a reader now.
    present: Option<Card>,
    /// Whether the watcher has reported any card yet (`status.smartcard_present` is null until then).
    seen_any: bool,
}

/// The embedded provider of sandbox mode (cargo feature `sandbox`).
#[cfg(feature = "sandbox")]
pub type SandboxProvider = cis2_mock_idp::RunningProvider;
/// This build has no sandbox provider (built without the cargo feature `sandbox`).
#[cfg(not(feature = "sandbox"))]
pub type SandboxProvider = std::convert::Infallible;

/// What a build without the sandbox provider says when asked for it.
pub const NO_SANDBOX: &str = "this build of the agent has no sandbox provider (it was built without \
     the cargo feature `sandbox`, as a trust's package is): start it with the config file for NHS CIS2 \
     INT, Live or your provider (--config FILE, or $CIS2_AGENT_CONFIG)";

#[cfg(feature = "sandbox")]
async fn start_sandbox(data_dir: &Path) -> Result<(SandboxProvider, String), StartError> {
    let running = crate::sandbox::start(data_dir)
        .await
        .map_err(StartError::Sandbox)?;
    let issuer = running.issuer.clone();
    Ok((running, issuer))
}

#[cfg(not(feature = "sandbox"))]
async fn start_sandbox(_data_dir: &Path) -> Result<(SandboxProvider, String), StartError> {
    Err(StartError::Config(NO_SANDBOX.to_owned()))
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

/// How long the agent waits for the relay, which itself waits for the provider.
const RELAY_TIMEOUT: Duration = Duration::from_secs(30);

/// `extra_ca_pem`: the `[provider] ca_file`, already read (it is trusted for the relay too).
fn exchange(config: &Config, extra_ca_pem: Option<&str>) -> Result<Exchange, StartError> {
    let Some(provider) = &config.provider else {
        return Ok(Exchange::Direct(ClientAuth::None));
    };
    if provider.exchange.method == ExchangeMethod::Relay {
        let url = provider.exchange.relay_url.clone().unwrap_or_default();
        return RelayClient::new(&url, extra_ca_pem, RELAY_TIMEOUT)
            .map(Exchange::Relay)
            .map_err(StartError::Config);
    }
    client_auth(provider).map(Exchange::Direct)
}

fn client_auth(provider: &crate::config::ProviderConfig) -> Result<ClientAuth, StartError> {
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
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                StartError::Config(format!("cannot read key_file {}: {e}", path.display()))
            })?;
            let alg = match exchange.alg {
                SigningAlg::RS256 => Alg::RS256,
                SigningAlg::RS512 => Alg::RS512,
            };
            let mut key = SigningKey::from_pem(&pem, alg)
                .map_err(|e| StartError::Config(format!("key_file {}: {e}", path.display())))?;
            if let Some(kid) = &exchange.kid {
                key = key
                    .with_kid(kid)
                    .map_err(|e| StartError::Config(format!("[provider.exchange] kid: {e}")))?;
            }
            Ok(ClientAuth::PrivateKeyJwt(Box::new(key)))
        }
        ExchangeMethod::Relay => Err(StartError::Config(
            "the relay is not a client authentication method".into(),
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
            store,
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
        let store = store.unwrap_or_else(|| build_store(&config, &data_dir));
        let audit_options = AuditOptions {
            sync: config.agent.audit_sync,
            seal_key: store.audit_seal_key(),
        };
        let audit = AuditLog::open(&data_dir.join("audit.jsonl"), audit_options).map_err(|e| {
            StartError::Config(format!(
                "cannot open the audit log in {}: {e}",
                data_dir.display()
            ))
        })?;
        let (issuer, client_id, settings_from, sandbox, ca_file) = if config.is_sandbox() {
            let (running, issuer) = start_sandbox(&data_dir).await?;
            (
                issuer,
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
        let ca = cis2_oidc::http::read_ca_file(ca_file.as_deref()).map_err(StartError::Config)?;
        let settings = match &settings_from {
            Some(p) => ClientSettings {
                client_id,
                exchange: exchange(&config, ca.as_deref())?,
                scopes: p.scopes.clone(),
                acr_values: p.acr_values.clone(),
                prompt: p.prompt.clone(),
                max_age: p.max_age,
                redirect_ports: p.redirect_ports.clone(),
                login_timeout: Duration::from_secs(p.login_timeout_secs),
            },
            None => ClientSettings {
                client_id,
                exchange: Exchange::Direct(ClientAuth::None),
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
        let http = HttpClient::unpooled(ca.as_deref(), Duration::from_secs(15))
            .map_err(StartError::Config)?;
        let rp = RelyingParty {
            discovery: Discovery::new(issuer, http, clock.clone()),
            settings,
            clock: clock.clone(),
        };
        let (events, _) = broadcast::channel(256);
        let agent = Agent {
            inner: Arc::new(Inner {
                environment: config.environment.as_str().to_string(),
                rp,
                browser,
                clock,
                config,
                session: Mutex::new(None),
                generation: std::sync::atomic::AtomicU64::new(0),
                locks: std::sync::atomic::AtomicU64::new(0),
                login_flight: tokio::sync::Mutex::new(None),
                flight_task: Mutex::new(None),
                refresh_lock: tokio::sync::Mutex::new(()),
                audiences: audience::AudienceTokens::default(),
                events,
                identifier: Identifier::persistent(
                    data_dir.join("exe-hashes.json"),
                    store.audit_seal_key(),
                ),
                decisions: Decisions::new(data_dir.join("clients.json")),
                audit,
                approver,
                data_dir,
                store,
                life: Mutex::new(Life::default()),
                readers: Mutex::new(Readers::default()),
                stopping: watch::channel(false).0,
                _sandbox: sandbox,
            }),
        };
        agent.restore();
        if let Exchange::Relay(relay) = &agent.inner.rp.settings.exchange {
            tokio::spawn(watch_relay_logout(
                Arc::downgrade(&agent.inner),
                relay.clone(),
            ));
        }
        let weak = Arc::downgrade(&agent.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LIFECYCLE_TICK).await;
                let Some(inner) = weak.upgrade() else { break };
                Agent { inner }.tick().await;
            }
        });
        Ok(agent)
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
            .await
    }

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

    async fn run_change_role(&self) -> Result<Status, AgentError> {
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

    pub fn is_sandbox(&self) -> bool {
        self.inner.config.is_sandbox()
    }

    /// The embedded provider, in sandbox mode.
    pub fn sandbox_provider(&self) -> Option<&SandboxProvider> {
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
    fn settled_status(&self) -> Status {
        self.status_with(Some(false))
    }

    /// The browser sign-in or role change under way, if any.
    async fn flight_in_progress(&self) -> Option<Flight> {
        let flight = self.inner.login_flight.lock().await;
        flight.as_ref().filter(|rx| flight_running(rx)).cloned()
    }

    /// `signing_in`: whether a flight is under way (`None`: cannot tell this moment).
    fn status_with(&self, signing_in: Option<bool>) -> Status {
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

    fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.inner.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(Locked)` with the reason and how to unlock, while the session is locked.
    pub fn check_unlocked(&self) -> Result<(), AgentError> {
        // One lock at a time: status() takes session then life, so never hold life while taking session.
        let (locked, by_card) = {
            let life = self.life();
            (life.locked.clone(), life.locked_by_card)
        };
        let card_back = if by_card && self.inner.config.workstation.same_card_unlocks {
            "put the same smartcard back, or "
        } else {
            ""
        };
        match &locked {
            Some(reason) if self.session().is_some() => Err(AgentError::Locked(format!(
                "The session is locked ({reason}). To unlock it the clinician must {card_back}sign in again (cis2ctl login, or the agent's window)."
            ))),
            _ => Ok(()),
        }
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, Readers> {
        self.inner.readers.lock().unwrap_or_else(|e| e.into_inner())
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

    /// A client asked for something: the inactivity clock starts again.
    fn touch(&self) {
        let now = self.inner.clock.now();
        self.life().last_activity = now;
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

    /// A receiver that turns `true` when the agent stops. Each connection holds one until it has sent
    /// its last events, which is what [`Agent::stop`] waits for.
    pub fn stopping_signal(&self) -> watch::Receiver<bool> {
        self.inner.stopping.subscribe()
    }

    /// Whether [`Agent::stop`] has been called.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    /// Tells every subscriber the agent is stopping (`agent_stopping`, whether the session survives),
    /// then has every connection close once that event is written; waits for them at most `grace`.
    /// Without it a client would see its connection close and could not tell a stop from a crash.
    pub async fn stop(&self, grace: Duration) {
        let session_survives = self.session().is_some()
            && !self.is_sandbox()
            && self.inner.store.status().kind == "keyring";
        tracing::info!(session_survives, "the agent is stopping");
        self.emit(Event::AgentStopping { session_survives });
        self.inner.stopping.send_replace(true);
        if tokio::time::timeout(grace, self.inner.stopping.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                "some connections had not closed {} ms after the stop; they are dropped",
                grace.as_millis()
            );
        }
    }

    /// Locks the session (inactivity, a workstation signal): tokens and identity are withheld until the
    /// same clinician signs in again.
    pub fn lock(&self, reason: &str) {
        self.lock_with(reason, false);
    }

    /// Every lock, whatever gave it: API Platform tokens are dropped (they are fetched again after the
    /// unlock), and `by_card` lets the same card unlock it.
    fn lock_with(&self, reason: &str, by_card: bool) {
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

    /// Which session answers belong to; changes when the person signed in changes.
    pub fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn next_generation(&self) {
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn install(&self, session: SignedIn, fresh_authentication: bool) {
        self.install_if(session, fresh_authentication, None);
    }

    /// Installs `session` unless the person behind the session changed since `expected` (a refresh
    /// that finished after a sign-out or another clinician's sign-in is dropped). Saving and swapping
    /// happen under the session lock, so two saves never interleave and the file matches memory.
    fn install_if(
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
    fn restore(&self) {
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
    fn save_lock_state(&self) {
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

    /// The timers: absolute limit, inactivity, renewal before expiry, and the end of a session that
    /// cannot be renewed (announced `expiring_notice_secs` ahead).
    async fn tick(&self) {
        let now = self.inner.clock.now();
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

    pub fn whoami(&self) -> Result<User, AgentError> {
        self.check_unlocked()?;
        self.session()
            .as_ref()
            .map(|s| s.user.clone())
            .ok_or_else(AgentError::not_signed_in)
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
    async fn sign_in_flight(
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

    /// The agent's clock.
    pub fn now(&self) -> u64 {
        self.inner.clock.now()
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

    /// Whether putting the same smartcard back would unlock the current lock.
    pub fn card_would_unlock(&self) -> bool {
        self.life().locked_by_card && self.inner.config.workstation.same_card_unlocks
    }

    /// The programs the clinician chose "Always allow" or "Deny" for.
    pub fn remembered_programs(&self) -> Vec<crate::policy::Remembered> {
        self.inner.decisions.list()
    }

    /// Forgets a remembered decision (by its short id or hash); the next request asks again.
    pub fn forget_program(&self, id: &str) -> std::io::Result<bool> {
        crate::policy::revoke(&self.data_dir().join("clients.json"), id)
    }

    /// Whether `login` must go to the browser: nobody signed in, the session locked, or a session that
    /// cannot be renewed and is about to end.
    fn needs_authentication(&self) -> bool {
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

    async fn run_sign_in(&self, timeout: Option<Duration>) -> Result<Status, AgentError> {
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

    /// The access token, renewed first when it would not last `min_valid_secs` (or is inside the
    /// refresh margin) and a refresh token is held.
    pub async fn token(&self, request: TokenRequest) -> Result<TokenAnswer, AgentError> {
        self.check_unlocked()?;
        if let (Some(audience), None) = (&request.audience, &request.scope) {
            return self
                .audience_token(audience, request.min_valid_secs.unwrap_or(0))
                .await;
        }
        if request.audience.is_some() || request.scope.is_some() {
            return Err(AgentError::BadParams(
                "This provider does not issue down-scoped tokens: ask without audience and scope for the session's token.".into(),
            ));
        }
        self.renew(request.min_valid_secs.unwrap_or(0), Caller::Client)
            .await
    }

    /// The token, renewed first when it would not last `min_valid` seconds (or is inside the refresh
    /// margin) and a refresh token is held. Single-flight; the background renewal backs off after
    /// provider failures, a client's request tries the provider again at most once a second.
    async fn renew(&self, min_valid: u64, caller: Caller) -> Result<TokenAnswer, AgentError> {
        if let Some(answer) = self.cached_token(min_valid, true)? {
            return Ok(answer);
        }
        let installs_before = self.life().installs;
        // Single-flight: one refresh at a time. Whoever waited takes the token the refresh produced
        // if it lasts what they asked for; the margin only drives renewal ahead of need, and judging
        // a fresh token by it would refresh again for every waiter when tokens live shorter.
        let _guard = self.inner.refresh_lock.lock().await;
        let refreshed_meanwhile = self.life().installs != installs_before;
        if let Some(answer) = self.cached_token(min_valid, !refreshed_meanwhile)? {
            return Ok(answer);
        }
        let generation = self.generation();
        let Some(current) = self.session().clone() else {
            return Err(AgentError::not_signed_in());
        };
        let now = self.inner.clock.now();
        let Some(refresh_token) = current.refresh_token.clone() else {
            return if current.expires_at > now + min_valid {
                Ok(answer_from(&current, self.life().tokens_installed_at))
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
        let next_attempt = {
            let mut life = self.life();
            let client_due = life.last_refresh_attempt + 1;
            let next_attempt = match caller {
                Caller::Background => life.backoff_until,
                Caller::Client => life.backoff_until.min(client_due),
            };
            if now >= next_attempt {
                life.last_refresh_attempt = now;
            }
            next_attempt
        };
        let result = if now < next_attempt {
            Err(None)
        } else {
            self.inner
                .rp
                .refresh(&refresh_token, &current)
                .await
                .map_err(Some)
        };
        match result {
            Ok(renewed) => {
                crash_point("after_refresh_answer");
                let answer = answer_from(&renewed, now);
                let role_before = current.user.clone();
                let renewed_user = renewed.user.clone();
                let expires_at = renewed.expires_at;
                // Saved before the old refresh token is dropped: a crash loses nothing. Dropped if
                // the clinician changed while the provider answered.
                if !self.install_if(renewed, false, Some(generation)) {
                    return Err(AgentError::NotSignedIn(
                        "The clinician signed in here changed while the token was being renewed; ask again.".into(),
                    ));
                }
                crash_point("after_refresh_saved");
                self.emit(Event::TokenRefreshed { expires_at });
                if role_differs(&role_before, &renewed_user) {
                    self.emit(Event::RoleChanged { user: renewed_user });
                }
                if expires_at <= now + min_valid {
                    return Err(AgentError::TokenTooShort(format!(
                        "min_valid_secs = {min_valid} is longer than the provider's tokens last ({} s); ask for less.",
                        expires_at.saturating_sub(now)
                    )));
                }
                Ok(answer)
            }
            Err(Some(err @ (SignInError::RefreshRefused(_) | SignInError::SubjectChanged))) => {
                self.end_session_if(
                    format!("the provider ended the session: {err}"),
                    Some(generation),
                );
                Err(AgentError::NotSignedIn(format!(
                    "The session has ended: {err}. Sign in again."
                )))
            }
            Err(err) => {
                let why = match &err {
                    Some(err) => {
                        self.back_off(now, err.to_string());
                        err.to_string()
                    }
                    None => format!(
                        "{}; the next attempt is due in {} s",
                        self.life().last_refresh_error.clone().unwrap_or_default(),
                        next_attempt.saturating_sub(now)
                    ),
                };
                // Anything else leaves the session as it was: serve what is still valid, else say why.
                if current.expires_at > now + min_valid {
                    tracing::warn!(error = %why, "refresh failed; serving the cached token");
                    Ok(answer_from(&current, self.life().tokens_installed_at))
                } else if err.as_ref().is_none_or(SignInError::is_outage) {
                    Err(AgentError::Unreachable(format!(
                        "The token could not be renewed because the Care Identity Service could not be reached ({why}); the session is kept — try again shortly."
                    )))
                } else {
                    Err(AgentError::SignInFailed(format!(
                        "The token could not be renewed: {why}. The session is kept."
                    )))
                }
            }
        }
    }

    /// Exponential backoff with ±20% jitter, 1 s doubling to at most 60 s.
    fn back_off(&self, now: u64, error: String) {
        let mut life = self.life();
        life.last_refresh_error = Some(error);
        life.backoff_until = now + backoff_secs(life.backoff_step);
        life.backoff_step += 1;
    }

    /// The current token if it lasts `min_valid` seconds, and, `with_margin`, past the renewal margin.
    fn cached_token(
        &self,
        min_valid: u64,
        with_margin: bool,
    ) -> Result<Option<TokenAnswer>, AgentError> {
        let now = self.inner.clock.now();
        let session = self.session();
        let Some(current) = session.as_ref() else {
            return Err(AgentError::not_signed_in());
        };
        let needed = if with_margin {
            min_valid.max(self.renewal_margin(current.expires_at))
        } else {
            min_valid
        };
        Ok((current.expires_at > now + needed)
            .then(|| answer_from(current, self.life().tokens_installed_at)))
    }

    /// How long before `expires_at` the token is renewed ahead of need: `refresh_margin_secs`, or half
    /// the token's lifetime when the provider's tokens live shorter than twice that (else every token
    /// would be inside the margin from the moment it arrives, and renewed on every tick).
    fn renewal_margin(&self, expires_at: u64) -> u64 {
        let margin = self.inner.config.session.refresh_margin_secs;
        match self.life().tokens_installed_at {
            0 => margin,
            installed_at => margin.min(expires_at.saturating_sub(installed_at) / 2),
        }
    }

    fn end_session(&self, reason: String) -> Option<SignedIn> {
        self.end_session_if(reason, None)
    }

    /// Ends the session unless the person behind it changed since `expected`.
    fn end_session_if(&self, reason: String, expected: Option<u64>) -> Option<SignedIn> {
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

    fn end_at_provider_later(&self, ended: SignedIn) {
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

/// The reason every client is given when CIS2's back-channel logout reaches the agent.
pub const ENDED_AT_CIS2: &str =
    "the Care Identity session was ended centrally (signed out elsewhere or by an administrator)";
/// The longest wait between attempts to reopen the relay's event stream.
const RELAY_RETRY_MAX: Duration = Duration::from_secs(60);

/// While someone is signed in, keeps the relay's event stream for their CIS2 session (`sid`) open and
/// signs them out when the relay reports the session ended. Reconnects with backoff; follows hand-overs.
async fn watch_relay_logout(weak: std::sync::Weak<Inner>, relay: RelayClient) {
    let mut retry = Duration::from_secs(1);
    let mut told_no_ticket = None;
    loop {
        let watched = {
            let Some(inner) = weak.upgrade() else { return };
            let agent = Agent { inner };
            // The generation changes only under the session lock: read both under it, so a
            // hand-over cannot pair one clinician's sid with the next one's generation.
            let session = agent.session();
            let generation = agent.generation();
            let ids = session
                .as_ref()
                .and_then(|s| Some((s.sid.clone()?, s.sub.clone(), s.events_ticket.clone())));
            drop(session);
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
                        Agent { inner }.end_session_if(ENDED_AT_CIS2.into(), Some(generation));
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

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s => format!("{} hours", s / 3600),
    }
}

/// Whether the flight has not answered yet and its task still runs (a cancelled one drops its sender).
fn flight_running(flight: &Flight) -> bool {
    flight.borrow().is_none() && flight.has_changed().is_ok()
}

/// The flight's outcome, once it ends.
async fn wait_for_flight(mut flight: Flight) -> Result<Status, AgentError> {
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
enum FlightKind {
    SignIn,
    /// Re-authentication with role selection, for the clinician already signed in.
    ChangeRole,
}

/// Who wants the token renewed: the background renewal obeys the backoff; a client's request may reach
/// the provider once a second whatever the backoff, so the first request after an outage finds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Client,
    Background,
}

/// The wait after `failures` failed background renewals in a row: 1 s doubling to at most 60 s, each
/// ±20% (the session's, and the API Platform tokens' in `audience`).
fn backoff_secs(failures: u32) -> u64 {
    use rand::Rng;
    let base = 1u64 << failures.min(6);
    let jittered = (base as f64 * rand::thread_rng().gen_range(0.8..1.2)).round() as u64;
    jittered.clamp(1, 60)
}

/// How often the session's timers are checked.
const LIFECYCLE_TICK: Duration = Duration::from_millis(250);

/// Tests of crash safety set `CIS2_TEST_CRASH_AT` to a step name; the process then dies there, as a
/// power cut or `kill -9` would. Compiled in only with the `test-hooks` feature, which the system tests
/// turn on and release builds and packages do not: a shipped agent cannot be crashed this way.
#[cfg(feature = "test-hooks")]
fn crash_point(step: &str) {
    if std::env::var("CIS2_TEST_CRASH_AT").is_ok_and(|v| v == step) {
        eprintln!("CIS2_TEST_CRASH_AT={step}: aborting here for a crash-safety test");
        std::process::abort();
    }
}

#[cfg(not(feature = "test-hooks"))]
fn crash_point(_step: &str) {}

/// Tests of hand-over races set `CIS2_TEST_PAUSE_TOKEN_MS` to hold each `token` answer that long
/// after it was read, widening the window in which a sign-out can overtake it. Only with the
/// `test-hooks` feature, like [`crash_point`].
#[cfg(feature = "test-hooks")]
pub async fn test_pause_token() {
    if let Some(ms) = std::env::var("CIS2_TEST_PAUSE_TOKEN_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "test-hooks"))]
pub async fn test_pause_token() {}

/// The store the config asks for: the keychain, or memory (always in the sandbox, whose provider does
/// not outlive the agent). A keychain that cannot be used means memory, said in `status`.
fn build_store(config: &Config, data_dir: &std::path::Path) -> Arc<dyn TokenStore> {
    if config.is_sandbox() {
        return Arc::new(MemoryStore { warning: None });
    }
    match config.agent.store {
        crate::config::StoreKind::Memory => Arc::new(MemoryStore { warning: None }),
        crate::config::StoreKind::Keyring => {
            let opened = crate::store::platform_credentials()
                .and_then(|credentials| KeyringStore::open(data_dir, &credentials));
            match opened {
                Ok(store) => Arc::new(store),
                Err(e) => {
                    let warning = format!(
                        "store = \"keyring\" was asked for, but {e}; the session is kept in memory only and will not survive a restart"
                    );
                    tracing::warn!(%warning);
                    Arc::new(MemoryStore {
                        warning: Some(warning),
                    })
                }
            }
        }
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

fn answer_from(session: &SignedIn, installed_at: u64) -> TokenAnswer {
    TokenAnswer {
        access_token: session.access_token.expose().to_string(),
        token_type: "Bearer",
        expires_at: session.expires_at,
        lifetime_secs: (installed_at != 0).then(|| session.expires_at.saturating_sub(installed_at)),
    }
}
