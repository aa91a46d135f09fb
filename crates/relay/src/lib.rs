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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Why the relay did not start, with the file or address at fault (the config itself was valid:
/// [`config::load`] judged it). Displays as the one line `cis2-relay` prints before exiting 1.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot read the key file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Key {
        path: PathBuf,
        source: cis2_jose::JoseError,
    },
    #[error("the active key is not among the keys")]
    NoActiveKey,
    #[error(transparent)]
    ProviderClient(#[from] cis2_oidc::http::HttpSetupError),
    #[error("redis_url: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("cannot read {}: {source}", path.display())]
    ReadTls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] cis2_tls::TlsConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

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
pub async fn start(config: RelayConfig) -> Result<RunningRelay, StartError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    config: RelayConfig,
    clock: SharedClock,
) -> Result<RunningRelay, StartError> {
    let mut keys = Vec::new();
    let mut active = None;
    let read_key = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| StartError::ReadKey {
            path: path.clone(),
            source,
        })
    };
    let bad_key = |path: &PathBuf| {
        let path = path.clone();
        move |source| StartError::Key { path, source }
    };
    for path in &config.keys {
        let mut key = SigningKey::from_pem(&read_key(path)?, config.alg).map_err(bad_key(path))?;
        if let Some(kid) = config.kids.get(path) {
            key = key.with_kid(kid).map_err(bad_key(path))?;
        }
        if *path == config.active {
            active = Some(key.clone());
        }
        keys.push(key);
    }
    let active = active.ok_or(StartError::NoActiveKey)?;
    let mut platforms = Vec::new();
    for platform in &config.api_platform {
        let key = SigningKey::from_pem(&read_key(&platform.key)?, cis2_jose::Alg::RS512)
            .and_then(|k| k.with_kid(&platform.kid))
            .map_err(bad_key(&platform.key))?;
        platforms.push((platform.clone(), key));
    }
    let tickets = ticket::Tickets::new(&keys, &active);
    let http = HttpClient::with_ca_file(config.ca_file.as_deref(), PROVIDER_TIMEOUT)?;
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
        Some(url) => fanout::Fanout::redis(url).map_err(StartError::Redis)?,
        None => fanout::Fanout::memory(),
    };
    let tls = match &config.tls {
        Some((cert, key)) => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path).map_err(|source| StartError::ReadTls {
                    path: path.clone(),
                    source,
                })
            };
            Some(cis2_tls::server_config(&read(cert)?, &read(key)?)?)
        }
        None => None,
    };
    let cannot_listen = |source| StartError::Listen {
        addr: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(cannot_listen)?;
    let addr = listener.local_addr().map_err(cannot_listen)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use cis2_jose::Alg;

    fn config_in(dir: &std::path::Path, listen: &str) -> RelayConfig {
        std::fs::write(
            dir.join("a.pem"),
            SigningKey::generate(Alg::RS512).to_pkcs8_pem(),
        )
        .unwrap();
        let text = format!(
            "[relay]\nlisten = \"{listen}\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"https://cis2.example:443/realms/Healthcare\"\nclient_id = \"1.apps.national\"\n\
             [signing]\nkeys = [\"a.pem\"]\n"
        );
        config::parse(&text, "relay.toml", dir).unwrap()
    }

    /// What the config could not know at load: each failure names the file or address at fault.
    #[tokio::test]
    async fn a_start_that_fails_says_which_file_or_address() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = start(config_in(dir.path(), &addr.to_string()))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StartError::Listen { addr: a, .. } if *a == addr),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );

        let config = config_in(dir.path(), "127.0.0.1:0");
        std::fs::remove_file(dir.path().join("a.pem")).unwrap();
        let err = start(config).await.err().unwrap();
        assert!(matches!(&err, StartError::ReadKey { .. }), "{err:?}");
        let key = dir.path().join("a.pem");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read the key file {}: ", key.display())),
            "{err}"
        );

        let config = config_in(dir.path(), "127.0.0.1:0");
        std::fs::write(&key, "not a key").unwrap();
        let err = start(config).await.err().unwrap();
        assert!(matches!(&err, StartError::Key { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!("{}: ", key.display())),
            "{err}"
        );
    }
}
