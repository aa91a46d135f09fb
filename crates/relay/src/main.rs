//! `cis2-relay --config FILE`: see the crate documentation and docs/deployment.md.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cis2-relay",
    version,
    about = "The vendor's confidential client for NHS CIS2: redeems desktop agents' sign-in codes and passes on back-channel logout"
)]
struct Args {
    /// The relay's TOML configuration (docs/deployment.md).
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIS2_RELAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match cis2_relay::config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cis2-relay: {e}");
            std::process::exit(2);
        }
    };
    let running = match cis2_relay::start(config).await {
        Ok(running) => running,
        Err(e) => {
            eprintln!("cis2-relay: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {}", running.url);
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match terminate.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    #[cfg(windows)]
    let _ = tokio::signal::ctrl_c().await;
    running.stop().await;
}
