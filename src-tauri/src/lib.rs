//! The desktop app, `cis2-agent`: the agent's core running in this process — the same socket and
//! contract as `cis2-agentd` — behind a tray icon and one window. This crate is glue only: each
//! command is one call into `cis2_core::desktop`, the tray mirrors the view the core computes, and the
//! window (`ui/`) draws that view. No sign-in, token or IPC logic lives here.

use cis2_core::desktop::{Approvals, Desktop, View};
use cis2_core::policy::Remembered;
use cis2_core::service::{self, Launch};
use clap::Parser;
use std::sync::{Arc, Mutex};
use tauri::menu::{Menu, MenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Emitter, Manager, Runtime, State, WindowEvent};

#[tauri::command]
fn view(desktop: State<'_, Desktop>) -> View {
    desktop.view()
}

#[tauri::command]
async fn login(desktop: State<'_, Desktop>) -> Result<View, String> {
    desktop.login().await
}

#[tauri::command]
fn cancel_login(desktop: State<'_, Desktop>) -> View {
    desktop.cancel_login()
}

#[tauri::command]
async fn change_role(desktop: State<'_, Desktop>) -> Result<View, String> {
    desktop.change_role().await
}

#[tauri::command]
async fn logout(desktop: State<'_, Desktop>) -> Result<View, String> {
    desktop.logout().await
}

#[tauri::command]
fn answer_approval(desktop: State<'_, Desktop>, id: u64, answer: String) -> Result<View, String> {
    desktop.answer_approval(id, &answer)
}

#[tauri::command]
fn remembered_programs(desktop: State<'_, Desktop>) -> Vec<Remembered> {
    desktop.remembered_programs()
}

#[tauri::command]
fn forget_program(desktop: State<'_, Desktop>, id: String) -> Result<Vec<Remembered>, String> {
    desktop.forget_program(&id)
}

/// The window's commands, for the real app and for the mock runtime in tests.
pub fn with_commands<R: Runtime>(builder: tauri::Builder<R>) -> tauri::Builder<R> {
    builder.invoke_handler(tauri::generate_handler![
        view,
        login,
        cancel_login,
        change_role,
        logout,
        answer_approval,
        remembered_programs,
        forget_program
    ])
}

/// The desktop app: `cis2-agentd`'s options, and whether to start in the tray.
#[derive(Parser, Debug)]
#[command(name = "cis2-agent", version)]
struct Args {
    #[command(flatten)]
    launch: Launch,
    /// Start in the tray, without showing the window (for start at login).
    #[arg(long)]
    minimized: bool,
}

/// The tray's menu items, kept to enable and disable them as the state changes.
struct TrayItems<R: Runtime> {
    sign_in: MenuItem<R>,
    change_role: MenuItem<R>,
    sign_out: MenuItem<R>,
}

fn show_window<R: Runtime>(app: &AppHandle<R>) {
    if let Some(window) = app.get_webview_window("main") {
        let _ = window.unminimize();
        let _ = window.show();
        let _ = window.set_focus();
    }
}

fn tray_icon(state: &str) -> tauri::image::Image<'static> {
    let bytes: &'static [u8] = match state {
        "signed_in" => include_bytes!("../../icons/tray-signed-in.png"),
        "locked" => include_bytes!("../../icons/tray-locked.png"),
        "signing_in" => include_bytes!("../../icons/tray-signing-in.png"),
        _ => include_bytes!("../../icons/tray-signed-out.png"),
    };
    tauri::image::Image::from_bytes(bytes).expect("a tray icon shipped with the app")
}

/// What the tray's tooltip says: the state in words, and who and which role when signed in.
pub fn tray_tooltip(view: &View) -> String {
    let sandbox = if view.sandbox { " (SANDBOX)" } else { "" };
    let state = serde_json::to_value(view.state).unwrap_or_default();
    match state.as_str() {
        Some("signed_in") => {
            let who = view
                .name
                .clone()
                .or_else(|| view.uid.clone())
                .unwrap_or_default();
            match &view.role {
                Some(role) => format!("CIS2 Agent{sandbox}: {who}, {}", role.name),
                None => format!("CIS2 Agent{sandbox}: {who}, no role"),
            }
        }
        Some("locked") => format!("CIS2 Agent{sandbox}: locked"),
        Some("signing_in") => format!("CIS2 Agent{sandbox}: signing in…"),
        _ => format!("CIS2 Agent{sandbox}: signed out"),
    }
}

fn update_tray<R: Runtime>(app: &AppHandle<R>, view: &View) {
    let state = serde_json::to_value(view.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if let Some(tray) = app.tray_by_id("main") {
        let _ = tray.set_icon(Some(tray_icon(&state)));
        let _ = tray.set_tooltip(Some(tray_tooltip(view)));
    }
    if let Some(items) = app.try_state::<TrayItems<R>>() {
        let signed_in = state == "signed_in";
        let _ = items
            .sign_in
            .set_enabled(state == "signed_out" || state == "locked");
        let _ = items
            .change_role
            .set_enabled(signed_in && view.roles.len() > 1);
        let _ = items.sign_out.set_enabled(signed_in || state == "locked");
    }
}

fn build_tray<R: Runtime>(app: &AppHandle<R>, desktop: &Desktop) -> tauri::Result<()> {
    let sign_in = MenuItem::with_id(app, "sign_in", "Sign in", true, None::<&str>)?;
    let change_role = MenuItem::with_id(app, "change_role", "Change role", false, None::<&str>)?;
    let sign_out = MenuItem::with_id(app, "sign_out", "Sign out", false, None::<&str>)?;
    let open = MenuItem::with_id(app, "open", "Open", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(app, &[&sign_in, &change_role, &sign_out, &open, &quit])?;
    let view = desktop.view();
    TrayIconBuilder::with_id("main")
        .icon(tray_icon("signed_out"))
        .tooltip(tray_tooltip(&view))
        .menu(&menu)
        .on_menu_event(|app, event| {
            let desktop = app.state::<Desktop>().inner().clone();
            let app = app.clone();
            match event.id.as_ref() {
                "sign_in" => {
                    show_window(&app);
                    tauri::async_runtime::spawn(async move { desktop.login().await });
                }
                "change_role" => {
                    tauri::async_runtime::spawn(async move { desktop.change_role().await });
                }
                "sign_out" => {
                    tauri::async_runtime::spawn(async move { desktop.logout().await });
                }
                "open" => show_window(&app),
                "quit" => app.exit(0),
                _ => {}
            }
        })
        .build(app)?;
    app.manage(TrayItems {
        sign_in,
        change_role,
        sign_out,
    });
    update_tray(app, &view);
    Ok(())
}

/// Starts the agent in this process, the tray and the window; returns when the app quits.
pub fn run() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIS2_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let launch = args.launch;
    let minimized = args.minimized;
    let approvals = Arc::new(Approvals::default());
    // The running service lives as long as the app: dropping it stops serving the socket.
    let service_slot: Arc<Mutex<Option<service::Service>>> = Arc::new(Mutex::new(None));
    let slot = service_slot.clone();
    let app = with_commands(tauri::Builder::default())
        // First: a second launch focuses this one instead of starting another agent.
        .plugin(tauri_plugin_single_instance::init(|app, _args, _cwd| {
            show_window(app)
        }))
        .setup(move |app| {
            let started = tauri::async_runtime::block_on(async {
                let running = service::start(&launch, Some(approvals.clone())).await?;
                let desktop = Desktop {
                    agent: running.agent.clone(),
                    approvals: approvals.clone(),
                };
                let handle = app.handle().clone();
                desktop.watch(move |view| {
                    let _ = handle.emit("view", &view);
                    update_tray(&handle, &view);
                    if !view.approvals.is_empty() {
                        show_window(&handle);
                    }
                });
                Ok::<_, service::StartFailure>((running, desktop))
            });
            let (running, desktop) = match started {
                Ok(started) => started,
                Err((code, message)) => {
                    eprintln!("cis2-agent: {message}");
                    std::process::exit(i32::from(code));
                }
            };
            println!("listening on {}", running.socket().display());
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(running);
            build_tray(app.handle(), &desktop)?;
            app.manage(desktop);
            if !minimized {
                show_window(app.handle());
            }
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the window keeps the agent running in the tray; Quit in the tray ends it.
            if let WindowEvent::CloseRequested { api, .. } = event {
                api.prevent_close();
                let _ = window.hide();
            }
        })
        .build(tauri::generate_context!("../tauri.conf.json"))
        .expect("the window system could not start (is there a display?)");
    app.run(move |_, event| {
        if let tauri::RunEvent::Exit = event {
            service_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
    });
}
