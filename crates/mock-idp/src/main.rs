//! `cis2-mock-idp`: runs the sandbox CIS2 provider until interrupted.

use cis2_mock_idp::{Lifetimes, Options, TlsPem, model};
use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// A sandbox NHS CIS2 provider on loopback. Not NHS CIS2: test users only.
#[derive(Parser, Debug)]
#[command(name = "cis2-mock-idp", version)]
struct Args {
    /// Port to listen on; 0 picks a free one (the issuer is printed on stdout).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Host name the issuer uses (default: the bind address); must match the TLS certificate.
    #[arg(long)]
    issuer_host: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Users file (TOML); default: the shipped test users.
    #[arg(long)]
    users: Option<PathBuf>,
    /// Clients file (TOML); default: the shipped sandbox client.
    #[arg(long)]
    clients: Option<PathBuf>,
    /// Access token lifetime in seconds.
    #[arg(long, default_value_t = Lifetimes::default().access_token)]
    access_token_ttl: u64,
    /// ID token lifetime in seconds.
    #[arg(long, default_value_t = Lifetimes::default().id_token)]
    id_token_ttl: u64,
    /// Refresh token lifetime in seconds.
    #[arg(long, default_value_t = Lifetimes::default().refresh_token)]
    refresh_token_ttl: u64,
    /// Authorization code lifetime in seconds.
    #[arg(long, default_value_t = Lifetimes::default().code)]
    code_ttl: u64,
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<(), String> {
    let mut options = Options {
        bind: args.bind,
        port: args.port,
        issuer_host: args.issuer_host,
        lifetimes: Lifetimes {
            code: args.code_ttl,
            access_token: args.access_token_ttl,
            id_token: args.id_token_ttl,
            refresh_token: args.refresh_token_ttl,
            ..Lifetimes::default()
        },
        ..Options::default()
    };
    if let Some(path) = &args.users {
        options.users = model::load_users(path)?;
    }
    if let Some(path) = &args.clients {
        options.clients = model::load_clients(path)?;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        options.tls = Some(TlsPem {
            cert: read(cert)?,
            key: read(key)?,
        });
    }
    let running = cis2_mock_idp::start(options)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", running.issuer);
    eprintln!(
        "SANDBOX CIS2 provider (not NHS CIS2) listening on {}\n  discovery: {}/.well-known/openid-configuration\n  admin API: loopback only, see docs/mock-idp.md\nPress Ctrl-C to stop.",
        running.addr, running.issuer
    );
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    running.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cis2-mock-idp: {message}");
            ExitCode::from(1)
        }
    }
}
