//! Starting the agent as a running service, the same way for both front ends (`cis2-agentd` and the
//! desktop app): which config, no core dumps, the agent, the workstation and smartcard watchers, and the
//! socket being served.

use crate::agent::{Agent, AgentOptions};
use crate::browser::Browser;
use crate::config::{self, Config};
use crate::ipc;
use crate::policy::Approver;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the command line chose; both programs take these options (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Launch {
    /// Config file (default: $CIS2_AGENT_CONFIG, else the OS config folder's cis2-agent/config.toml,
    /// else the machine-wide one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Socket path (default: $CIS2_AGENT_SOCK, else [agent] socket, else the per-user runtime folder);
    /// on Windows a pipe name (default \\.\pipe\cis2-agent-<user SID>).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Sign in against the embedded sandbox provider (not NHS CIS2), whatever the config says.
    #[arg(long)]
    pub sandbox: bool,
    /// Print the sign-in address instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
}

/// The config the launch names: a file named by `--config` or `$CIS2_AGENT_CONFIG` must exist; the
/// default one may be absent, and then the agent runs the sandbox.
pub fn load_config(launch: &Launch) -> Result<Config, String> {
    if launch.sandbox {
        return Ok(Config::sandbox());
    }
    let named = launch.config.is_some()
        || std::env::var_os("CIS2_AGENT_CONFIG").is_some_and(|v| !v.is_empty());
    match config::resolve_path(launch.config.as_deref()) {
        Some(path) if named || path.exists() => config::load(&path).map_err(|e| e.to_string()),
        _ => Ok(Config::sandbox()),
    }
}

/// A running agent and its socket. Dropping it stops serving and removes the socket file.
pub struct Service {
    pub agent: Agent,
    pub socket: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
        // A named pipe goes when its last handle closes; a Unix socket leaves a file.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Why the service did not start: the exit code a program should use (2 for configuration, 1 for the
/// socket) and the message.
pub type StartFailure = (u8, String);

/// Starts everything; `approver` answers `client_policy = "ask"` (the desktop app has one).
pub async fn start(
    launch: &Launch,
    approver: Option<Arc<dyn Approver>>,
) -> Result<Service, StartFailure> {
    // Tokens live in this process's memory: no core dumps of it, and no ptrace attach by other
    // processes of the same user (Linux PR_SET_DUMPABLE).
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not switch off core dumps; continuing");
    }
    let config = load_config(launch).map_err(|e| (2, e))?;
    if config.is_sandbox() {
        eprintln!(
            "SANDBOX MODE: signing in against the embedded test provider, NOT NHS CIS2. Test users only."
        );
    }
    let socket = ipc::paths::socket_path(launch.socket.as_deref(), config.agent.socket.as_deref());
    let mut options = AgentOptions::new(config, Browser::from_env(launch.no_browser));
    options.approver = approver;
    let agent = Agent::start(options)
        .await
        .map_err(|e| (2, e.to_string()))?;
    if let Some(sandbox) = agent.sandbox_provider() {
        eprintln!("sandbox provider: {}", sandbox.issuer);
    }
    if let Err(why) = crate::workstation::watch(agent.clone()) {
        tracing::warn!(%why, "running without workstation lock signals");
    }
    crate::smartcard::watch(agent.clone());
    let bound = ipc::bind(&socket)
        .await
        .map_err(|e| (1, format!("cannot listen on {}: {e}", socket.display())))?;
    let socket = bound.path().to_path_buf();
    let server = tokio::spawn(ipc::serve(
        bound,
        agent.clone(),
        ipc::ServeOptions::default(),
    ));
    Ok(Service {
        agent,
        socket,
        server,
    })
}

impl Service {
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}
