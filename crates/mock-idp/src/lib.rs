//! `cis2-mock-idp`: a sandbox NHS CIS2 Authentication provider that runs on loopback with no network.
//!
//! It behaves like CIS2 as `cis2-reference.md` describes it — the ForgeRock realm path and an issuer that
//! always spells its port (`:443` included), discovery, `/authorize` with PKCE S256 required, `acr_values`
//! deciding the authenticators offered, role selection, `/access_token` with `private_key_jwt`,
//! `client_secret_post` or `none`, CIS2's claims by scope, key rotation, refresh tokens, end session and
//! back-channel logout — so that a client that works against it meets no CIS2 surprise except the ones
//! the reference marks UNCONFIRMED. A loopback-only admin API lets tests inject faults, rotate keys,
//! revoke grants, step the clock and script the next ID token for a relying party's negative tests.
//!
//! The agent embeds it as its sandbox; tests and people run it as the `cis2-mock-idp` binary.

pub mod browser;
pub mod http;
pub mod keys;
pub mod model;
pub mod pages;
pub mod provider;
pub use cis2_tls as tls;

pub use model::{Authenticator, Client, ClientAuthMethod, User};
pub use provider::{Lifetimes, Provider, REALM_PATH};

use cis2_jose::{Alg, SigningKey};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// TLS material in PEM.
#[derive(Clone)]
pub struct TlsPem {
    pub cert: String,
    pub key: String,
}

/// How to run a provider.
#[derive(Clone)]
pub struct Options {
    /// The address to listen on; loopback unless you mean otherwise.
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// The host the issuer names (default: the bind address). Set it to the name a TLS certificate holds.
    pub issuer_host: Option<String>,
    pub tls: Option<TlsPem>,
    pub users: Vec<User>,
    pub clients: Vec<Client>,
    pub lifetimes: Lifetimes,
    /// The first signing key (default: a fresh one).
    pub signing_key: Option<SigningKey>,
    /// When set, `/admin` answers only requests that carry `Authorization: Bearer <this>` (besides
    /// coming from loopback). Loopback is not a user boundary: on a shared computer every user can reach
    /// it, so a provider embedded in someone's agent sets a secret only that user can read.
    pub admin_secret: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            issuer_host: None,
            tls: None,
            users: model::parse_users(model::DEFAULT_USERS, "shipped users.toml")
                .expect("the shipped users parse"),
            clients: model::parse_clients(model::DEFAULT_CLIENTS, "shipped clients.toml")
                .expect("the shipped clients parse"),
            lifetimes: Lifetimes::default(),
            signing_key: None,
            admin_secret: None,
        }
    }
}

/// A provider serving in the background; dropping it stops it.
pub struct RunningProvider {
    pub issuer: String,
    pub addr: SocketAddr,
    pub provider: Arc<Provider>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningProvider {
    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningProvider {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Why a provider could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsConfigError),
}

/// The issuer for a provider reached at `host:port`: the port always spelled out, as CIS2 spells `:443`.
pub fn issuer_for(https: bool, host: &str, port: u16) -> String {
    let scheme = if https { "https" } else { "http" };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{scheme}://{host}:{port}{REALM_PATH}")
}

/// Binds, builds the provider and serves it in the background.
pub async fn start(options: Options) -> Result<RunningProvider, StartError> {
    let addr = SocketAddr::new(options.bind, options.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let host = options
        .issuer_host
        .clone()
        .unwrap_or_else(|| local.ip().to_string());
    let issuer = issuer_for(options.tls.is_some(), &host, local.port());
    let tls_config = match &options.tls {
        Some(pem) => Some(tls::server_config(&pem.cert, &pem.key).map_err(StartError::Tls)?),
        None => None,
    };
    let signing_key = options
        .signing_key
        .unwrap_or_else(|| SigningKey::generate(Alg::RS256));
    let provider = Arc::new(Provider::new(
        issuer.clone(),
        options.users,
        options.clients,
        options.lifetimes,
        signing_key,
    ));
    let app = http::router(provider.clone(), options.admin_secret);
    let (tx, rx) = oneshot::channel::<()>();
    let stop = async {
        let _ = rx.await;
    };
    let task = match tls_config {
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config);
            let app = app.into_make_service_with_connect_info::<tls::Peer>();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await;
            })
        }
        None => {
            let app = app.into_make_service_with_connect_info::<tls::Peer>();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await;
            })
        }
    };
    Ok(RunningProvider {
        issuer,
        addr: local,
        provider,
        shutdown: Some(tx),
        task: Some(task),
    })
}
