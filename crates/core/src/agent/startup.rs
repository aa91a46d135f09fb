//! What [`Agent::start`](super::Agent::start) builds from the config: the sandbox provider, the code
//! exchange (direct with the client's credentials, or through the relay), the token store and the
//! private data folder.

use super::{SandboxProvider, StartError};
use crate::config::{Config, ExchangeMethod, SigningAlg};
use crate::oidc::exchange::ClientAuth;
use crate::oidc::relay::RelayClient;
use crate::oidc::rp::Exchange;
use crate::secret::Secret;
use crate::store::{KeyringStore, MemoryStore, TokenStore};
use cis2_jose::{Alg, SigningKey};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "sandbox")]
pub(super) async fn start_sandbox(
    data_dir: &Path,
) -> Result<(SandboxProvider, String), StartError> {
    let running = crate::sandbox::start(data_dir).await?;
    let issuer = running.issuer.clone();
    Ok((running, issuer))
}

#[cfg(not(feature = "sandbox"))]
pub(super) async fn start_sandbox(
    _data_dir: &Path,
) -> Result<(SandboxProvider, String), StartError> {
    Err(StartError::NoSandbox)
}

/// How long the agent waits for the relay, which itself waits for the provider.
pub(super) const RELAY_TIMEOUT: Duration = Duration::from_secs(30);

/// `extra_ca_pem`: the `[provider] ca_file`, already read (it is trusted for the relay too).
pub(super) fn exchange(
    config: &Config,
    extra_ca_pem: Option<&str>,
) -> Result<Exchange, StartError> {
    let Some(provider) = &config.provider else {
        return Ok(Exchange::Direct(ClientAuth::None));
    };
    if provider.exchange.method == ExchangeMethod::Relay {
        let url = provider.exchange.relay_url.clone().unwrap_or_default();
        return RelayClient::new(&url, extra_ca_pem, RELAY_TIMEOUT)
            .map(Exchange::Relay)
            .map_err(StartError::Https);
    }
    client_auth(provider).map(Exchange::Direct)
}

pub(super) fn client_auth(
    provider: &crate::config::ProviderConfig,
) -> Result<ClientAuth, StartError> {
    let exchange = &provider.exchange;
    match exchange.method {
        ExchangeMethod::None => Ok(ClientAuth::None),
        ExchangeMethod::ClientSecretPost => {
            let name = exchange.secret_env.clone().unwrap_or_default();
            match std::env::var(&name) {
                Ok(secret) if !secret.is_empty() => Ok(ClientAuth::SecretPost(Secret::new(secret))),
                _ => Err(StartError::ClientSecretNotSet { variable: name }),
            }
        }
        ExchangeMethod::PrivateKeyJwt => {
            let path = exchange.key_file.clone().unwrap_or_default();
            let pem = match std::fs::read_to_string(&path) {
                Ok(pem) => pem,
                Err(source) => return Err(StartError::KeyFileUnreadable { path, source }),
            };
            let alg = match exchange.alg {
                SigningAlg::RS256 => Alg::RS256,
                SigningAlg::RS512 => Alg::RS512,
            };
            let mut key = match SigningKey::from_pem(&pem, alg) {
                Ok(key) => key,
                Err(source) => return Err(StartError::KeyFileInvalid { path, source }),
            };
            if let Some(kid) = &exchange.kid {
                key = key.with_kid(kid).map_err(StartError::BadKid)?;
            }
            Ok(ClientAuth::PrivateKeyJwt(Box::new(key)))
        }
        ExchangeMethod::Relay => Err(StartError::RelayIsNotClientAuth),
    }
}

/// The store the config asks for: the keychain, or memory (always in the sandbox, whose provider does
/// not outlive the agent). A keychain that cannot be used means memory, said in `status`.
pub(super) fn build_store(config: &Config, data_dir: &std::path::Path) -> Arc<dyn TokenStore> {
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

pub(super) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
