//! The desktop app, `cis2-agent`: the agent's core running in this process — the same socket and
//! contract as `cis2-agentd` — behind a tray icon, and a window in a process of its own started when
//! it is wanted. This crate is glue only: each window command is one call into
//! `cis2_core::desktop` (carried from the window process by [`bridge`]), the tray mirrors the view
//! the core computes, and the window (`ui/`) draws that view. No sign-in, token or IPC logic lives
//! here.
//!
//! Two processes because a clinician's PC runs the app all day with the window closed: WebKit's
//! processes and heap would otherwise stay resident (hundreds of MB) for a window nobody looks at.

pub mod bridge;
mod handoff;
mod shell;
pub mod start_failure;
pub mod window;

use cis2_core::service::Launch;
use clap::Parser;

pub use shell::tray_tooltip;
pub use window::with_commands;

/// The desktop app: `cis2-agentd`'s options, and whether to start in the tray.
#[derive(Parser, Debug)]
#[command(name = "cis2-agent", version)]
struct Args {
    #[command(flatten)]
    launch: Launch,
    /// Start in the tray, without showing the window (for start at login).
    #[arg(long)]
    minimized: bool,
    /// Be the window of the running app (the app starts this itself, with pipes to it).
    #[arg(long, hide = true)]
    window: bool,
}

/// The app's command line, for the launcher's tests (the options it hands over are the app's).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// What start at sign-in runs: the `cis2-agent` launcher where this is `cis2-agent-app` beside it
/// (Linux), else this program.
fn program_to_start() -> std::path::PathBuf {
    let program = std::env::current_exe().unwrap_or_else(|_| "cis2-agent".into());
    let launcher = program
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_suffix("-app"))
        .map(|name| program.with_file_name(name));
    match launcher {
        Some(launcher) if launcher.exists() => launcher,
        _ => program,
    }
}

/// Tauri's context (config, embedded ui/dist, icons): generated once for both processes.
fn context() -> tauri::Context<tauri::Wry> {
    tauri::generate_context!("../tauri.conf.json")
}

/// The name the desktop knows the app's windows by: GTK makes it their X11 `WM_CLASS`
/// (`cis2-agent`, `Cis2-agent`) and their Wayland app id. Docks and taskbars match it to the desktop
/// entry's `StartupWMClass`, which Tauri's `.deb` writes as the program the entry runs
/// (tauri.conf.json's `mainBinaryName`), to show the window under the entry it was started from. Set,
/// because GTK would take this program's file name: on Linux the window runs in `cis2-agent-app`.
pub const WM_CLASS: &str = "cis2-agent";

/// Runs the app, or its window process; returns when it ends.
pub fn run() {
    // Before GTK starts: it takes the program's name only if none is set.
    #[cfg(target_os = "linux")]
    glib::set_prgname(Some(WM_CLASS));
    let args = match Args::try_parse() {
        Ok(args) => args,
        // `--help` and `--version` are answers, not failures.
        Err(e) if !e.use_stderr() => e.exit(),
        // A mistyped option in a shortcut or a Run key is a failed start like any other.
        Err(e) => {
            let _ = e.print();
            start_failure::show(&e.render().to_string());
            std::process::exit(e.exit_code());
        }
    };
    // Before anything else: a second launch should cost the person no more than a bus call.
    if !args.window && handoff::to_running_app() {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIS2_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.window {
        window::run();
    } else {
        shell::run(args.launch, args.minimized);
    }
}

#[cfg(test)]
mod tests {
    /// Tauri's `.deb` names the desktop entry's program and `StartupWMClass` after `mainBinaryName`;
    /// the windows must carry that name, or the desktop shows them apart from the entry.
    #[test]
    fn the_windows_are_named_as_the_desktop_entry_expects() {
        let config: serde_json::Value =
            serde_json::from_str(include_str!("../../tauri.conf.json")).unwrap();
        assert_eq!(config["mainBinaryName"], super::WM_CLASS);
    }
}
