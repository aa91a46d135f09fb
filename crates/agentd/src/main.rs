//! `cis2-agentd`: the CIS2 sign-in agent without a GUI. It loads the config (or runs the sandbox),
//! listens on the local socket, prints `listening on PATH` when ready, and serves until stopped.

use cis2_core::agent::{Agent, AgentOptions};
use cis2_core::browser::Browser;
use cis2_core::config::{self, Config};
use cis2_core::ipc;
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The NHS CIS2 sign-in agent, without a GUI.
#[derive(Parser, Debug)]
#[command(name = "cis2-agentd", version)]
struct Args {
    /// Config file (default: $CIS2_AGENT_CONFIG, else the OS config folder's cis2-agent/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Socket path (default: $CIS2_AGENT_SOCK, else [agent] socket, else the per-user runtime folder).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Sign in against the embedded sandbox provider (not NHS CIS2), whatever the config says.
    #[arg(long)]
    sandbox: bool,
    /// Print the sign-in address instead of opening a browser.
    #[arg(long)]
    no_browser: bool,
}

fn load_config(args: &Args) -> Result<Config, String> {
    if args.sandbox {
        return Ok(Config::sandbox());
    }
    let named = args.config.is_some()
        || std::env::var_os("CIS2_AGENT_CONFIG").is_some_and(|v| !v.is_empty());
    match config::resolve_path(args.config.as_deref()) {
        // A file named by --config or $CIS2_AGENT_CONFIG must exist; the default one may be absent
        // (then: sandbox).
        Some(path) if named || path.exists() => config::load(&path).map_err(|e| e.to_string()),
        _ => Ok(Config::sandbox()),
    }
}

async fn run(args: Args) -> Result<(), (u8, String)> {
    // Tokens live in this process's memory: no core dumps of it, and no ptrace attach by other
    // processes of the same user (Linux PR_SET_DUMPABLE).
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("cis2-agentd: could not switch off core dumps ({e}); continuing");
    }
    let config = load_config(&args).map_err(|e| (2, e))?;
    if config.is_sandbox() {
        eprintln!(
            "SANDBOX MODE: signing in against the embedded test provider, NOT NHS CIS2. Test users only."
        );
    }
    let socket = ipc::paths::socket_path(args.socket.as_deref(), config.agent.socket.as_deref());
    let agent = Agent::start(AgentOptions::new(
        config,
        Browser::from_env(args.no_browser),
    ))
    .await
    .map_err(|e| (2, e.to_string()))?;
    if let Some(sandbox) = agent.sandbox_provider() {
        eprintln!("sandbox provider: {}", sandbox.issuer);
    }
    if let Err(why) = cis2_core::workstation::watch(agent.clone()) {
        tracing::warn!(%why, "running without workstation lock signals");
    }
    cis2_core::smartcard::watch(agent.clone());
    let bound = ipc::server::bind(&socket)
        .await
        .map_err(|e| (1, format!("cannot listen on {}: {e}", socket.display())))?;
    println!("listening on {}", bound.path().display());
    let _ = std::io::stdout().flush();
    let path = bound.path().to_path_buf();
    let server = tokio::spawn(ipc::serve(bound, agent, ipc::ServeOptions::default()));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| (1, e.to_string()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    server.abort();
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Every heap block is zeroed when freed: after a sign-out nothing of that clinician's tokens or claims
/// stays behind in memory the allocator hands out again (docs/security.md).
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIS2_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("cis2-agentd: {message}");
            ExitCode::from(code)
        }
    }
}
