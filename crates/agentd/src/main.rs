//! `cis2-agentd`: the CIS2 sign-in agent without a GUI. It loads the config (or runs the sandbox),
//! listens on the local socket, prints `listening on PATH` when ready, and serves until stopped.

use cis2_core::service::{self, Launch};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

/// The NHS CIS2 sign-in agent, without a GUI.
#[derive(Parser, Debug)]
#[command(name = "cis2-agentd", version)]
struct Args {
    #[command(flatten)]
    launch: Launch,
}

async fn run(args: Args) -> Result<(), (u8, String)> {
    let running = service::start(&args.launch, None)
        .await
        .map_err(|failure| (failure.exit_code(), failure.to_string()))?;
    println!("listening on {}", running.socket().display());
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| (1, e.to_string()))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    // Windows: Ctrl+C, Ctrl+Break or the console closing; a service manager ends the process.
    #[cfg(windows)]
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| (1, e.to_string()))?;
    running.stop().await;
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
