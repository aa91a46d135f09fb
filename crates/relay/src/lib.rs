//! `cis2-relay`: the vendor-run confidential client that CIS2 requires (cis2-reference.md §3). A desktop
//! agent runs the browser sign-in and keeps the PKCE verifier; it hands the code here, and the relay —
//! which alone holds the `private_key_jwt` signing keys — redeems it at CIS2, validates the ID token with
//! the agent's own rules (`cis2-oidc`), fetches userinfo and answers with the tokens and the user. It
//! publishes its public keys for CIS2's Connection Manager, receives CIS2's back-channel logout and
//! passes it on to the agents holding that session over server-sent events, in memory or, across
//! instances, through Redis. Stateless apart from those live subscriptions, so it scales out.

pub mod config;
pub mod fanout;
pub mod limiter;
pub mod metrics;
pub mod server;
pub mod ticket;

use cis2_jose::SigningKey;
use cis2_oidc::clock::{SharedClock, SystemClock};
use cis2_oidc::discovery::Discovery;
use cis2_oidc::exchange::ClientAuth;
use cis2_oidc::http::HttpClient;
use cis2_oidc::rp::{ClientSettings, Exchange, RelyingParty};
use config::RelayConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long the relay waits for CIS2 on one call.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(15);

/// A relay serving in the background; dropping it stops it.
pub struct RunningRelay {
    /// `http://…` or `https://…` with the bound port.
    pub url: String,
    pub addr: SocketAddr,
    pub relay: Arc<server::Relay>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningRelay {
    /// Stops accepting, ends the event streams, lets exchanges under way finish (within their time limit)
    /// and waits for the server task to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads the keys, binds the listener and serves.
pub async fn start(config: RelayConfig) -> Result<RunningRelay, String> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    config: RelayConfig,
    clock: SharedClock,
) -> Result<RunningRelay, String> {
    let mut keys = Vec::new();
    let mut active = None;
    for path in &config.keys {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        let mut key = SigningKey::from_pem(&pem, config.alg)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(kid) = config.kids.get(path) {
            key = key
                .with_kid(kid)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if *path == config.active {
            active = Some(key.clone());
        }
        keys.push(key);
    }
    let active = active.ok_or("the active key is not among the keys")?;
    let mut platforms = Vec::new();
    for platform in &config.api_platform {
        let path = &platform.key;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        let key = SigningKey::from_pem(&pem, cis2_jose::Alg::RS512)
            .and_then(|k| k.with_kid(&platform.kid))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        platforms.push((platform.clone(), key));
    }
    let tickets = ticket::Tickets::new(&keys, &active);
    let http = HttpClient::with_ca_file(config.ca_file.as_deref(), PROVIDER_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let rp = RelyingParty {
        discovery: Discovery::new(config.issuer.clone(), http, clock.clone()),
        settings: ClientSettings {
            client_id: config.client_id.clone(),
            exchange: Exchange::Direct(ClientAuth::PrivateKeyJwt(Box::new(active))),
            scopes: Vec::new(),
            acr_values: None,
            prompt: None,
            max_age: None,
            redirect_ports: Vec::new(),
            login_timeout: Duration::from_secs(300),
        },
        clock: clock.clone(),
    };
    let fanout = match &config.redis_url {
        Some(url) => fanout::Fanout::redis(url)?,
        None => fanout::Fanout::memory(),
    };
    let tls = match &config.tls {
        Some((cert, key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            Some(cis2_tls::server_config(&read(cert)?, &read(key)?).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let url = format!("{}://{addr}/", if tls.is_some() { "https" } else { "http" });
    let relay = Arc::new(
        server::Relay::new(config, rp, &keys, tickets, fanout, clock).with_platforms(platforms),
    );
    let app = server::router(relay.clone());
    let limits = cis2_tls::ServeLimits {
        header_read_timeout: Duration::from_secs(relay.config.limits.read_timeout_secs),
        // A request that has just begun may take its headers' and its body's time to arrive, then the
        // exchange's time limit.
        drain: Duration::from_secs(
            relay.config.limits.request_timeout_secs
                + 2 * relay.config.limits.read_timeout_secs
                + 1,
        ),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let closing = relay.clone();
    let stop = async move {
        let _ = rx.await;
        // Event streams never finish by themselves: end them so their agents reconnect elsewhere.
        closing.close_event_streams();
    };
    let task = match tls {
        Some(tls) => {
            let listener = cis2_tls::TlsListener::new(listener, tls);
            tokio::spawn(cis2_tls::serve(listener, app, limits, stop))
        }
        None => tokio::spawn(cis2_tls::serve(listener, app, limits, stop)),
    };
    Ok(RunningRelay {
        url,
        addr,
        relay,
        shutdown: Some(tx),
        task: Some(task),
    })
}
