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
/// default one may be absent, and then the agent runs the sandbox (if this build has it).
pub fn load_config(launch: &Launch) -> Result<Config, String> {
    if launch.sandbox {
        return sandbox_config("--sandbox was given");
    }
    let named = launch.config.is_some()
        || std::env::var_os("CIS2_AGENT_CONFIG").is_some_and(|v| !v.is_empty());
    match config::resolve_path(launch.config.as_deref()) {
        Some(path) if named || path.exists() => config::load(&path).map_err(|e| e.to_string()),
        Some(path) => sandbox_config(&format!("there is no config file ({})", path.display())),
        None => sandbox_config("there is no config file"),
    }
}

/// The sandbox config, or, in a build without the sandbox provider, why the agent cannot start.
fn sandbox_config(why: &str) -> Result<Config, String> {
    if cfg!(feature = "sandbox") {
        Ok(Config::sandbox())
    } else {
        Err(format!("{why}, and {}.", crate::agent::NO_SANDBOX))
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

/// Why the service did not start, and the exit code a program should use for it
/// ([`StartFailure::exit_code`]: 2 for the configuration, 1 for the socket).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartFailure {
    /// The config file named cannot be used, or none was found and this build has no sandbox.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Agent(#[from] crate::agent::StartError),
    /// Another agent, or another program, already listens on the socket or holds the pipe: the words
    /// say which it is when the agent could tell.
    #[error("cannot listen on {}: {source}", socket.display())]
    SocketInUse {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", socket.display())]
    Listen {
        socket: PathBuf,
        source: std::io::Error,
    },
}

impl StartFailure {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartFailure::Config(_) => 2,
            StartFailure::Agent(e) => e.exit_code(),
            StartFailure::SocketInUse { .. } | StartFailure::Listen { .. } => 1,
        }
    }

    /// Why `socket` could not be listened on: in use (another agent's socket that answers, a pipe
    /// another program holds: `bind` says which as `AddrInUse`), or anything else.
    fn listening(socket: &Path, source: std::io::Error) -> StartFailure {
        let socket = socket.to_path_buf();
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartFailure::SocketInUse { socket, source }
        } else {
            StartFailure::Listen { socket, source }
        }
    }

    /// The socket or pipe name another program already holds.
    pub fn socket_in_use(&self) -> Option<&Path> {
        match self {
            StartFailure::SocketInUse { socket, .. } => Some(socket),
            _ => None,
        }
    }
}

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
    let config = load_config(launch).map_err(StartFailure::Config)?;
    if config.is_sandbox() {
        eprintln!(
            "SANDBOX MODE: signing in against the embedded test provider, NOT NHS CIS2. Test users only."
        );
    }
    let socket = ipc::paths::socket_path(launch.socket.as_deref(), config.agent.socket.as_deref());
    let mut options = AgentOptions::new(config, Browser::from_env(launch.no_browser));
    options.approver = approver;
    let agent = Agent::start(options).await?;
    #[cfg(feature = "sandbox")]
    if let Some(sandbox) = agent.sandbox_provider() {
        eprintln!(
            "sandbox provider: {} (its admin API's secret is in {})",
            sandbox.issuer,
            crate::sandbox::admin_secret_path(agent.data_dir()).display()
        );
    }
    if let Some(note) = ipc::paths::fallback_note(&socket) {
        eprintln!("{note}");
    }
    if let Err(why) = crate::workstation::watch(agent.clone()) {
        tracing::warn!(%why, "running without workstation lock signals");
    }
    if agent.config().workstation.on_card_removal != crate::config::SignalAction::Ignore
        && let Some(cards) = crate::smartcard::watch()
    {
        agent.follow_cards(cards);
    }
    let bound = ipc::bind(&socket)
        .await
        .map_err(|source| StartFailure::listening(&socket, source))?;
    let socket = bound.path().to_path_buf();
    let server = tokio::spawn(ipc::serve(
        bound,
        agent.clone(),
        ipc::ServeOptions::default(),
    ));
    tokio::spawn(announce_sign_ins(agent.subscribe()));
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

    /// Stops as a client can tell from a crash: every subscriber gets `agent_stopping` and each
    /// connection closes once it is written (waiting 2 s at most), then the socket goes.
    pub async fn stop(self) {
        self.agent.stop(std::time::Duration::from_secs(2)).await;
    }
}

/// Says who is signed in at every new sign-in (and role change), as a line on stdout: on a shared
/// computer a sign-in swapped for someone else's must not go unseen. (The window shows the clinician
/// too.) The line is written whole, so it goes straight out and no copy of the name stays behind in
/// stdout's buffer after a sign-out; a desktop notification is not sent, because it would pass the name
/// through libdbus's own heap, which the zeroing allocator does not reach.
async fn announce_sign_ins(mut events: tokio::sync::broadcast::Receiver<crate::agent::Event>) {
    use crate::agent::Event;
    use std::io::Write;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let user = match events.recv().await {
            Ok(Event::SignedIn { user }) | Ok(Event::RoleChanged { user }) => user,
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        let line = format!("{}\n", signed_in_line(&user));
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// `signed in: Amelia Hart (555021935107), Clinical Practitioner at Ward Hospital (RX1); not you? sign out now`.
pub fn signed_in_line(user: &crate::oidc::claims::User) -> String {
    let role = match &user.selected_role {
        Some(role) => format!(
            ", {} at {} ({})",
            role.name,
            role.org_name
                .as_deref()
                .unwrap_or("an unnamed organisation"),
            role.org_code
        ),
        None => String::new(),
    };
    format!(
        "signed in: {} ({}){role}; if this is not you, sign out now",
        user.name.as_deref().unwrap_or("a clinician with no name"),
        user.uid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(sandbox: bool) -> Launch {
        Launch {
            config: None,
            socket: None,
            sandbox,
            no_browser: true,
        }
    }

    #[cfg(feature = "sandbox")]
    #[test]
    fn the_sandbox_flag_gives_the_sandbox() {
        assert!(load_config(&launch(true)).expect("sandbox").is_sandbox());
    }

    /// Run by CI as `cargo test -p cis2-core --no-default-features --lib service::`.
    #[cfg(not(feature = "sandbox"))]
    #[tokio::test]
    async fn a_build_without_the_sandbox_refuses_it_and_says_what_to_give() {
        let refused = load_config(&launch(true)).expect_err("no sandbox in this build");
        assert!(
            refused.starts_with("--sandbox was given, and this build of the agent has no sandbox")
                && refused.contains("--config FILE"),
            "{refused}"
        );
        // A config file that is a sandbox file (or none at all) is refused when the agent starts.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::sandbox();
        config.agent.data_dir = Some(dir.path().to_path_buf());
        let started = Agent::start(AgentOptions::new(config, Browser::from_env(true))).await;
        let refused = started.err().expect("no sandbox in this build").to_string();
        assert!(
            refused.contains("built without the cargo feature `sandbox`"),
            "{refused}"
        );
    }

    /// A socket another agent answers on is told apart from other failures to listen, by variant and
    /// exit code, and still says what it said as a string.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_socket_in_use_is_its_own_failure_with_the_same_words() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let _first = ipc::bind(&socket).await.unwrap();
        let Err(held) = ipc::bind(&socket).await else {
            panic!("a second agent listened on a socket that answers");
        };
        let failure = StartFailure::listening(&socket, held);
        assert_eq!(failure.socket_in_use(), Some(socket.as_path()));
        assert_eq!(failure.exit_code(), 1);
        assert_eq!(
            failure.to_string(),
            format!(
                "cannot listen on {0}: another agent is already listening on {0}",
                socket.display()
            )
        );
        let other = StartFailure::listening(
            &socket,
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(matches!(other, StartFailure::Listen { .. }), "{other:?}");
        assert_eq!(other.socket_in_use(), None);
        assert_eq!(other.exit_code(), 1);
    }

    /// Every configuration reason exits with 2, the agent's own start errors included.
    #[test]
    fn configuration_failures_exit_with_2() {
        assert_eq!(StartFailure::Config("no config".into()).exit_code(), 2);
        let agent = StartFailure::from(crate::agent::StartError::NoProvider);
        assert_eq!(agent.exit_code(), 2);
        assert_eq!(agent.to_string(), "the config has no [provider]");
    }
}
