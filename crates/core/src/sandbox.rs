//! The embedded sandbox provider of `environment = "sandbox"`: started on loopback, its admin API behind
//! a secret made for this run and kept in a file only this user can read. Loopback is not a user
//! boundary (every user of a shared computer reaches it), so without the secret another user could
//! script the next token this agent receives.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The file, in the agent's data folder, that holds the sandbox admin API's secret.
pub const ADMIN_SECRET_FILE: &str = "sandbox-admin.secret";

pub fn admin_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_SECRET_FILE)
}

/// Why the sandbox provider did not start. Neither variant quotes the admin secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error("cannot write {}: {source}", path.display())]
    AdminSecret {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Its port or its TLS set-up.
    #[error("{0}")]
    Provider(#[from] cis2_mock_idp::StartError),
}

/// Starts the provider; its admin secret is written 0600 to [`admin_secret_path`] first.
pub async fn start(data_dir: &Path) -> Result<cis2_mock_idp::RunningProvider, SandboxError> {
    let secret = cis2_jose::random_token(32);
    let path = admin_secret_path(data_dir);
    if let Err(source) = write_private(&path, secret.as_bytes()) {
        return Err(SandboxError::AdminSecret { path, source });
    }
    Ok(cis2_mock_idp::start(cis2_mock_idp::Options {
        admin_secret: Some(secret),
        ..cis2_mock_idp::Options::default()
    })
    .await?)
}

/// Replaces `path` with a new file, 0600 from the moment it exists.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e);
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}
