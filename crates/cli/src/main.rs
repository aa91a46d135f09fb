//! `cis2ctl`: talk to a running cis2-agent from a terminal or a script.
//! Exit codes: 0 done; 1 the agent answered with an error; 2 bad usage; 3 no agent at the socket.

use cis2_ipc_client::{Client, ClientError};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(
    name = "cis2ctl",
    version,
    about = "Command-line client of a running cis2-agent"
)]
struct Args {
    /// The agent's socket (default: $CIS2_AGENT_SOCK, else [agent] socket from the config, else the per-user default).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The agent's config file (used to find the socket and data folder).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the agent's JSON answer unchanged.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Who is signed in, in which environment, until when.
    Status,
    /// Sign in through the browser (or join a sign-in under way).
    Login {
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// The signed-in user, their roles and assurance.
    Whoami,
    /// Print an access token (renewed first if needed).
    Token {
        /// The token must stay valid at least this many seconds.
        #[arg(long = "min-valid")]
        min_valid: Option<u64>,
        #[arg(long)]
        audience: Option<String>,
        #[arg(long)]
        scope: Option<String>,
    },
    /// Sign out; every client is told.
    Logout,
    /// Choose another role (re-authenticates in the browser with role selection).
    ChangeRole,
    /// Print events as JSON lines until interrupted.
    Watch,
    /// Programs the person signed in allowed or refused (remembered decisions).
    Clients {
        #[command(subcommand)]
        action: Option<ClientsAction>,
    },
    /// The audit log of everything programs asked the agent for.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Subcommand, Debug)]
enum ClientsAction {
    /// Forget a remembered decision (ID from `cis2ctl clients`).
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum AuditAction {
    /// Check the hash chain: exit 0 intact, 1 with the first bad line named.
    Verify {
        /// The log file (default: audit.jsonl in the agent's data folder).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// The last lines of the log.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// The agent's config, when there is a file (the same search as the agent's). A file named by
/// `--config` or `$CIS2_AGENT_CONFIG` must load; the default one may be absent.
fn agent_config(args: &Args) -> Option<cis2_core::config::Config> {
    let named = args.config.is_some()
        || std::env::var_os("CIS2_AGENT_CONFIG").is_some_and(|v| !v.is_empty());
    let path = cis2_core::config::resolve_path(args.config.as_deref())?;
    if !named && !path.exists() {
        return None;
    }
    match cis2_core::config::load(&path) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("cis2ctl: {e}");
            std::process::exit(2);
        }
    }
}

fn data_dir(args: &Args) -> PathBuf {
    agent_config(args)
        .and_then(|c| c.agent.data_dir)
        .unwrap_or_else(cis2_core::config::default_data_dir)
}

/// The key the agent seals the audit log's head with: with `store = "keyring"` it is kept in the
/// keychain; otherwise there is none. An error says why the keychain could not be read.
fn audit_seal_key(args: &Args) -> Result<Option<cis2_core::audit::SealKey>, String> {
    let keyring = agent_config(args)
        .is_some_and(|c| !c.is_sandbox() && c.agent.store == cis2_core::config::StoreKind::Keyring);
    if !keyring {
        return Ok(None);
    }
    let credentials = cis2_core::store::platform_credentials().map_err(|e| e.0)?;
    cis2_core::store::existing_audit_seal_key(&data_dir(args), &credentials).map_err(|e| e.0)
}

/// Commands that read the agent's files instead of asking it.
fn offline(args: &Args) -> Option<ExitCode> {
    match &args.command {
        Command::Clients { action } => {
            let path = data_dir(args).join("clients.json");
            match action {
                None => {
                    let list: Vec<Value> = std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    if args.json {
                        println!("{}", Value::Array(list));
                    } else if list.is_empty() {
                        println!("No remembered decisions ({}).", path.display());
                    } else {
                        for d in &list {
                            println!(
                                "{}  {}  {}  (decided {})",
                                d["id"].as_str().unwrap_or("?"),
                                if d["allow"].as_bool() == Some(true) {
                                    "allowed"
                                } else {
                                    "refused"
                                },
                                d["path"].as_str().unwrap_or("(unknown path)"),
                                d["decided_at"].as_str().unwrap_or("?")
                            );
                        }
                    }
                    Some(ExitCode::SUCCESS)
                }
                Some(ClientsAction::Revoke { id }) => match cis2_core::policy::revoke(&path, id) {
                    Ok(true) => {
                        println!("Forgot decision {id}: that program will be asked again.");
                        Some(ExitCode::SUCCESS)
                    }
                    Ok(false) => {
                        eprintln!(
                            "cis2ctl: no remembered decision has id {id} (see `cis2ctl clients`)."
                        );
                        Some(ExitCode::from(1))
                    }
                    Err(e) => {
                        eprintln!("cis2ctl: cannot update {}: {e}", path.display());
                        Some(ExitCode::from(1))
                    }
                },
            }
        }
        Command::Audit { action } => {
            let default = data_dir(args).join("audit.jsonl");
            match action {
                AuditAction::Verify { file } => {
                    let path = file.clone().unwrap_or(default);
                    let seal_key = audit_seal_key(args).unwrap_or_else(|why| {
                        eprintln!(
                            "cis2ctl: the head file's seal cannot be checked ({why}); checking the chain alone."
                        );
                        None
                    });
                    match cis2_core::audit::verify(&path, seal_key.as_ref()) {
                        Ok(intact) => {
                            println!("{}: intact, {} records.", path.display(), intact.lines);
                            Some(ExitCode::SUCCESS)
                        }
                        Err(broken) => {
                            println!("{broken}");
                            Some(ExitCode::from(1))
                        }
                    }
                }
                AuditAction::Tail { n, file } => {
                    let path = file.clone().unwrap_or(default);
                    match cis2_core::audit::tail(&path, *n) {
                        Ok(lines) => {
                            for line in lines {
                                println!("{line}");
                            }
                            Some(ExitCode::SUCCESS)
                        }
                        Err(e) => {
                            eprintln!("cis2ctl: cannot read {}: {e}", path.display());
                            Some(ExitCode::from(1))
                        }
                    }
                }
            }
        }
        _ => None,
    }
}

fn socket_path(args: &Args) -> PathBuf {
    // The config is only read when nothing quicker names the socket: `cis2ctl token` stays cheap.
    let env_named = std::env::var_os("CIS2_AGENT_SOCK").is_some_and(|v| !v.is_empty());
    let configured = if args.socket.is_some() || env_named {
        None
    } else {
        agent_config(args).and_then(|c| c.agent.socket)
    };
    cis2_core::ipc::paths::socket_path(args.socket.as_deref(), configured.as_deref())
}

fn when(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if unix > now {
        let left = unix - now;
        format!("in {} min {} s", left / 60, left % 60)
    } else {
        "already".into()
    }
}

fn describe_user(user: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut out = format!(
        "User:     {} ({})\n",
        user["name"].as_str().unwrap_or("(no name)"),
        text(&user["uid"])
    );
    match user.get("selected_role").filter(|r| !r.is_null()) {
        Some(role) => out.push_str(&format!(
            "Role:     {} at {} ({})\n",
            text(&role["name"]),
            role["org_name"].as_str().unwrap_or("unnamed organisation"),
            text(&role["org_code"])
        )),
        None if user["roles"].as_array().is_some_and(|r| r.is_empty()) => {
            out.push_str("Role:     none (this person has no national RBAC roles)\n")
        }
        None => out.push_str("Role:     none selected\n"),
    }
    let assurance = &user["assurance"];
    let amr: Vec<String> = assurance["amr"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "Signed in with: {} (acr {}, authentication assurance level {})\n",
        if amr.is_empty() {
            "unknown".into()
        } else {
            amr.join(", ")
        },
        assurance["acr"].as_str().unwrap_or("unknown"),
        assurance["authentication_assurance_level"]
            .as_str()
            .unwrap_or("unknown"),
    ));
    out
}

fn describe_status(status: &Value) -> String {
    let mut out = String::new();
    if status["environment"] == "sandbox" {
        out.push_str("SANDBOX: not NHS CIS2 (test users only)\n");
    } else {
        out.push_str(&format!(
            "Environment: {}\n",
            status["environment"].as_str().unwrap_or("?")
        ));
    }
    let state = status["state"].as_str().unwrap_or("?").replace('_', " ");
    out.push_str(&format!("State:    {state}\n"));
    if let Some(user) = status.get("user").filter(|u| !u.is_null()) {
        out.push_str(&describe_user(user));
    }
    if let Some(expires) = status["expires_at"].as_u64() {
        out.push_str(&format!("Token expires: {}\n", when(expires)));
    }
    out
}

fn run(args: &Args) -> Result<(), ClientError> {
    let mut client = Client::connect(&socket_path(args))?;
    let print = |value: &Value, human: String| {
        if args.json {
            println!("{value}");
        } else {
            print!("{human}");
        }
    };
    match &args.command {
        Command::Status => {
            client.set_timeout(Some(Duration::from_secs(30)))?;
            let status = client.call("status", json!({}))?;
            print(&status, describe_status(&status));
        }
        Command::Login { timeout } => {
            // A person typing `login` while someone is signed in wants to switch: the agent refuses
            // that (sign out first) unless the config allows switching.
            let params = match timeout {
                Some(t) => json!({"timeout_secs": t, "switch_user": true}),
                None => json!({"switch_user": true}),
            };
            eprintln!("Complete the sign-in in your browser…");
            let status = client.call("login", params)?;
            print(&status, describe_status(&status));
        }
        Command::Whoami => {
            client.set_timeout(Some(Duration::from_secs(30)))?;
            let user = client.call("whoami", json!({}))?;
            print(&user, describe_user(&user));
        }
        Command::Token {
            min_valid,
            audience,
            scope,
        } => {
            client.set_timeout(Some(Duration::from_secs(90)))?;
            let mut params = serde_json::Map::new();
            if let Some(m) = min_valid {
                params.insert("min_valid_secs".into(), json!(m));
            }
            if let Some(a) = audience {
                params.insert("audience".into(), json!(a));
            }
            if let Some(s) = scope {
                params.insert("scope".into(), json!(s));
            }
            let token = client.call("token", Value::Object(params))?;
            print(
                &token,
                format!("{}\n", token["access_token"].as_str().unwrap_or_default()),
            );
        }
        Command::Logout => {
            client.set_timeout(Some(Duration::from_secs(60)))?;
            let answer = client.call("logout", json!({}))?;
            print(&answer, "Signed out.\n".into());
        }
        Command::ChangeRole => {
            eprintln!("Choose your role in the browser…");
            let user = client.call("change_role", json!({}))?;
            print(&user, describe_user(&user));
        }
        Command::Clients { .. } | Command::Audit { .. } => {}
        Command::Watch => {
            client.call("subscribe", json!({}))?;
            loop {
                let event = client.next_event()?;
                println!("{event}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = offline(&args) {
        return code;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::NoAgent { path, source }) => {
            eprintln!(
                "cis2ctl: no agent is running at {} ({source}). Start cis2-agentd or the cis2-agent app.",
                path.display()
            );
            ExitCode::from(3)
        }
        Err(ClientError::Rpc { message, .. }) => {
            eprintln!("cis2ctl: {message}");
            ExitCode::from(1)
        }
        Err(other) => {
            eprintln!("cis2ctl: {other}");
            ExitCode::from(1)
        }
    }
}
