//! The long-lived app: the agent (`core::service`) and the tray icon, and no webview. The window is a
//! process of its own ([`crate::window`]), started when it is wanted (at launch unless
//! `--minimized`, Open or Sign in in the tray, a second launch, a program waiting for approval) and
//! gone when the person closes it, so that WebKit's memory is not held all day in the tray.

use crate::bridge::{self, ToWindow};
use cis2_core::desktop::{Approvals, Desktop, NewSignIns, View};
use cis2_core::service::{self, Launch};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tauri::menu::{Menu, MenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Manager, Runtime};
use tokio::sync::mpsc;

/// The window process while it runs: where to send it views, and when it was asked for (to log
/// how long it took to draw).
#[derive(Default)]
struct WindowProcess {
    running: Mutex<Option<Running>>,
}

struct Running {
    generation: u64,
    outbox: mpsc::UnboundedSender<ToWindow>,
}

impl WindowProcess {
    fn send(&self, message: ToWindow) -> bool {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .as_ref()
            .is_some_and(|r| r.outbox.send(message).is_ok())
    }
}

/// Brings the window to the front, starting its process if there is none.
fn open_window<R: Runtime>(app: &AppHandle<R>) {
    let Some(windows) = app.try_state::<Arc<WindowProcess>>() else {
        return;
    };
    let Some(desktop) = app.try_state::<Desktop>() else {
        return;
    };
    let windows = windows.inner().clone();
    if windows.send(ToWindow::Focus) {
        return;
    }
    let desktop = desktop.inner().clone();
    let (outbox, outgoing) = mpsc::unbounded_channel();
    // The view goes with the window, first down the pipe: the page draws it as it loads instead of
    // asking for it once its script runs.
    if let Ok(view) = serde_json::to_value(desktop.view()) {
        let _ = outbox.send(ToWindow::View { view });
    }
    let generation = {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    };
    *windows.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
        generation,
        outbox: outbox.clone(),
    });
    let asked = Instant::now();
    tauri::async_runtime::spawn(async move {
        let started = std::env::current_exe().and_then(|program| {
            tokio::process::Command::new(program)
                .arg("--window")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
        });
        match started {
            Ok(mut child) => {
                let (Some(to_window), Some(from_window)) =
                    (child.stdin.take(), child.stdout.take())
                else {
                    return;
                };
                let on_drawn = move || {
                    tracing::info!(
                        ms = asked.elapsed().as_millis() as u64,
                        "window drawn after it was asked for"
                    );
                };
                bridge::serve_window(desktop, from_window, to_window, outbox, outgoing, on_drawn)
                    .await;
                match child.wait().await {
                    Ok(status) if !status.success() => {
                        tracing::warn!(%status, "the window process ended abnormally");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the window process could not be waited for")
                    }
                    Ok(_) => {}
                }
            }
            Err(e) => tracing::error!(error = %e, "could not start the window process"),
        }
        let mut running = windows.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|r| r.generation == generation) {
            *running = None;
        }
    });
}

/// The tray's menu items, kept to enable and disable them as the state changes.
struct TrayItems<R: Runtime> {
    sign_in: MenuItem<R>,
    change_role: MenuItem<R>,
    sign_out: MenuItem<R>,
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

fn state_name(view: &View) -> String {
    serde_json::to_value(view.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What the tray's tooltip says: the state in words, and who and which role when signed in.
pub fn tray_tooltip(view: &View) -> String {
    let sandbox = if view.sandbox { " (SANDBOX)" } else { "" };
    match state_name(view).as_str() {
        "signed_in" => {
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
        "locked" => format!("CIS2 Agent{sandbox}: locked"),
        "signing_in" => format!("CIS2 Agent{sandbox}: signing in…"),
        _ => format!("CIS2 Agent{sandbox}: signed out"),
    }
}

fn update_tray<R: Runtime>(app: &AppHandle<R>, view: &View) {
    let state = state_name(view);
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
            match event.id.as_ref() {
                "sign_in" => {
                    open_window(app);
                    tauri::async_runtime::spawn(async move { desktop.login().await });
                }
                "change_role" => {
                    tauri::async_runtime::spawn(async move { desktop.change_role().await });
                }
                "sign_out" => {
                    tauri::async_runtime::spawn(async move { desktop.logout().await });
                }
                "open" => open_window(app),
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

/// GTK 3 on X11 loads the OpenGL driver when it opens the display (to pick visuals), whether or not
/// anything is drawn with it: Mesa's, with LLVM, is some 50 MB resident, more than the agent and the
/// tray together. The tray draws nothing with OpenGL, so this process starts itself again with
/// `GDK_GL=disable` (the environment cannot be changed safely once running). The window process
/// inherits it: WebKit then draws the window without GPU compositing (as the window tests always
/// have), which for a few forms costs nothing and opens faster with some 60 MB less. Returns only
/// if that is not needed or not possible; a person's own `GDK_GL` is left as it is.
#[cfg(unix)]
fn start_again_without_gl() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GDK_GL").is_some_and(|v| !v.is_empty()) {
        return;
    }
    let Ok(program) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(program)
        .args(std::env::args_os().skip(1))
        .env("GDK_GL", "disable")
        .exec();
    tracing::warn!(%error, "could not restart without OpenGL; the tray uses more memory");
}

/// Starts the agent in this process and the tray, and the window unless `minimized`; returns when
/// the app quits.
pub fn run(launch: Launch, minimized: bool) {
    #[cfg(unix)]
    start_again_without_gl();
    let approvals = Arc::new(Approvals::default());
    // The running service lives as long as the app: dropping it stops serving the socket.
    let service_slot: Arc<Mutex<Option<service::Service>>> = Arc::new(Mutex::new(None));
    let slot = service_slot.clone();
    let app = tauri::Builder::default()
        // First: a second launch opens the window of this one instead of starting another agent.
        .plugin(tauri_plugin_single_instance::init(|app, _args, _cwd| {
            open_window(app)
        }))
        .manage(Arc::new(WindowProcess::default()))
        .setup(move |app| {
            let started = tauri::async_runtime::block_on(async {
                let running = service::start(&launch, Some(approvals.clone())).await?;
                let desktop = Desktop {
                    agent: running.agent.clone(),
                    approvals: approvals.clone(),
                };
                let handle = app.handle().clone();
                let sign_ins = Mutex::new(NewSignIns::default());
                desktop.watch(move |view| {
                    update_tray(&handle, &view);
                    let windows = handle.state::<Arc<WindowProcess>>();
                    if let Ok(view_json) = serde_json::to_value(&view) {
                        windows.send(ToWindow::View { view: view_json });
                    }
                    // Every new sign-in is shown (who, in which role), so a swap cannot go unseen.
                    let new_sign_in = sign_ins
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_new(&view);
                    if new_sign_in || !view.approvals.is_empty() {
                        open_window(&handle);
                    }
                });
                Ok::<_, service::StartFailure>((running, desktop))
            });
            let (running, desktop) = match started {
                Ok(started) => started,
                Err(failure) => {
                    eprintln!("cis2-agent: {failure}");
                    crate::start_failure::show(&failure.to_string());
                    std::process::exit(i32::from(failure.exit_code()));
                }
            };
            println!("listening on {}", running.socket().display());
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(running);
            build_tray(app.handle(), &desktop)?;
            // The sign for scripts that the whole app is up: the socket alone is up before the tray.
            tracing::info!("tray icon shown");
            app.manage(desktop);
            if !minimized {
                open_window(app.handle());
            }
            Ok(())
        })
        .build(crate::context())
        .expect("the window system could not start (is there a display?)");
    app.run(move |_, event| match event {
        // This process has no window of its own: it stays in the tray until Quit.
        tauri::RunEvent::ExitRequested {
            code: None, api, ..
        } => api.prevent_exit(),
        tauri::RunEvent::Exit => {
            let running = service_slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            // Subscribers are told (`agent_stopping`) before their connections close.
            if let Some(running) = running {
                tauri::async_runtime::block_on(running.stop());
            }
        }
        _ => {}
    });
}
