//! The agent's public API, which both front ends and the IPC server call: start, status, login, whoami,
//! token, logout, and the event stream. The session is one value, `machine::State`, behind one lock
//! (`Inner::core`); every event goes through `machine::step`, and the modules below are the async shell
//! that carries out its effects (save, tell the clients, open the browser, call the provider).
//! Concurrent `login` calls share one browser flow, and concurrent `token` calls share one refresh.
//!
//! This file is the wiring: the options, the shared `Inner` every clone of [`Agent`] points at, start-up
//! and small accessors. Each job lives in a module of its own behind the same `Agent`: `access` (may a
//! program ask, remembered and audited), `session` (status, install, restore, save, end), `locks`
//! (lock, unlock, smartcards, activity), `signin` (single-flight sign-in and role change), `renewal`
//! (token, refresh, backoff), `timers` (the lifecycle tick), `relay_watch` (central sign-out through
//! the relay), `audience` (API Platform tokens), `startup` (what `start` builds from the config),
//! `errors`, `answers` (what callers are given) and `test_hooks`.

mod access;
mod answers;
mod audience;
mod errors;
mod locks;
pub mod machine;
mod relay_watch;
mod renewal;
mod session;
mod signin;
mod startup;
mod test_hooks;
mod timers;

pub use answers::{ActivityAnswer, Event, SessionState, Status, TokenAnswer, TokenRequest};
pub use errors::{
    AgentError, BadParamsReason, NotAllowedReason, NotSignedInReason, SignInFailedReason,
    StartError, UnreachableReason,
};
pub use machine::LockReason;
pub use relay_watch::ENDED_AT_CIS2;
pub use test_hooks::test_pause_token;

use crate::audit::{AuditLog, AuditOptions};
use crate::browser::Browser;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::http::HttpClient;
use crate::oidc::discovery::Discovery;
use crate::oidc::exchange::ClientAuth;
use crate::oidc::rp::{ClientSettings, Exchange, RelyingParty, SignedIn};
use crate::peer::Identifier;
use crate::policy::{Approver, Decisions};
use crate::store::TokenStore;
use renewal::backoff_secs;
use signin::FlightAnswer;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The sandbox's client registration at the embedded provider (shipped in cis2-mock-idp's clients.toml).
pub const SANDBOX_CLIENT_ID: &str = "100000000001.apps.national";

/// How to build an agent.
pub struct AgentOptions {
    pub config: Config,
    pub browser: Browser,
    pub clock: SharedClock,
    /// Who answers `client_policy = "ask"` (the desktop app's prompt); `None` refuses.
    pub approver: Option<Arc<dyn Approver>>,
    /// The token store; `None` builds the one the config asks for.
    pub store: Option<Arc<dyn TokenStore>>,
    /// Who runs the session's timers.
    pub timers: Timers,
}

/// Who runs the session's timers ([`Agent::tick`]: inactivity, expiry, absolute limit, renewal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Timers {
    /// The agent itself, every 250 ms with its clock: what the programs use.
    #[default]
    EveryQuarterSecond,
    /// Only whoever calls [`Agent::tick`]: tests that step a clock and look at what one tick did.
    Driven,
}

impl AgentOptions {
    pub fn new(config: Config, browser: Browser) -> AgentOptions {
        AgentOptions {
            config,
            browser,
            clock: Arc::new(SystemClock),
            approver: None,
            store: None,
            timers: Timers::default(),
        }
    }
}

/// Per-connection memory of a person's "Allow once".
#[derive(Debug, Default)]
pub struct ConnectionGrant {
    allowed_once: bool,
}

struct Inner {
    environment: String,
    rp: RelyingParty,
    browser: Browser,
    clock: SharedClock,
    config: Config,
    /// The part of the config `machine::step` reads.
    rules: machine::Rules,
    /// The session, and the browser flow's plumbing: the one lock every answer is read under.
    core: Mutex<Core>,
    /// One refresh at a time: held while the provider is asked (the machine's state is not).
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
    /// Set when the agent stops: every connection sends its last events and closes; each holds a
    /// receiver until it has, so the stop can wait for them.
    stopping: watch::Sender<bool>,
    /// The embedded provider in sandbox mode; kept alive with the agent.
    _sandbox: Option<SandboxProvider>,
}

/// What [`Inner::core`] guards: the machine's state, and, while its `flight` is set, the task running
/// that browser flow and the channel every caller waiting for it reads its answer from.
#[derive(Default)]
struct Core {
    state: machine::State<SignedIn>,
    flight_answer: Option<FlightAnswer>,
    flight_task: Option<tokio::task::AbortHandle>,
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

/// The agent. Cheap to clone; every clone is the same agent.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
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
            timers,
        } = options;
        let data_dir = config
            .agent
            .data_dir
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        startup::create_private_dir(&data_dir).map_err(|source| StartError::DataFolder {
            path: data_dir.clone(),
            source,
        })?;
        let store = store.unwrap_or_else(|| startup::build_store(&config, &data_dir));
        let audit_options = AuditOptions {
            sync: config.agent.audit_sync,
            seal_key: store.audit_seal_key(),
        };
        let audit =
            AuditLog::open(&data_dir.join("audit.jsonl"), audit_options).map_err(|source| {
                StartError::AuditLog {
                    data_dir: data_dir.clone(),
                    source,
                }
            })?;
        let (issuer, client_id, settings_from, sandbox, ca_file) = if config.is_sandbox() {
            let (running, issuer) = startup::start_sandbox(&data_dir).await?;
            (
                issuer,
                SANDBOX_CLIENT_ID.to_string(),
                None,
                Some(running),
                None,
            )
        } else {
            let provider = config.provider.clone().ok_or(StartError::NoProvider)?;
            (
                provider.issuer.clone(),
                provider.client_id.clone(),
                Some(provider.clone()),
                None,
                provider.ca_file.clone(),
            )
        };
        let ca = cis2_oidc::http::read_ca_file(ca_file.as_deref())?;
        let settings = match &settings_from {
            Some(p) => ClientSettings {
                client_id,
                exchange: startup::exchange(&config, ca.as_deref())?,
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
        let http = HttpClient::unpooled(ca.as_deref(), Duration::from_secs(15))?;
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
                rules: machine::Rules::of(&config),
                config,
                core: Mutex::new(Core::default()),
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
                stopping: watch::channel(false).0,
                _sandbox: sandbox,
            }),
        };
        agent.restore();
        if let Exchange::Relay(relay) = &agent.inner.rp.settings.exchange {
            tokio::spawn(relay_watch::watch_relay_logout(
                Arc::downgrade(&agent.inner),
                relay.clone(),
            ));
        }
        if timers == Timers::EveryQuarterSecond {
            timers::run_in_background(Arc::downgrade(&agent.inner));
        }
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

    pub fn is_sandbox(&self) -> bool {
        self.inner.config.is_sandbox()
    }

    /// The embedded provider, in sandbox mode.
    pub fn sandbox_provider(&self) -> Option<&SandboxProvider> {
        self.inner._sandbox.as_ref()
    }

    /// The one lock: the session's state and the flight under way.
    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.inner.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
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
        let session_survives = self.core().state.active().is_some()
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

    /// Which session answers belong to; changes when the person signed in changes.
    pub fn generation(&self) -> u64 {
        self.core().state.generation
    }

    /// The agent's clock.
    pub fn now(&self) -> u64 {
        self.inner.clock.now()
    }
}
