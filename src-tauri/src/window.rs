//! The window process (`cis2-agent --window`, started by the app when the window is wanted): the
//! webview and the window's commands, each one call carried to the app's `core::desktop` over the
//! [`bridge`](crate::bridge). Closing the window ends this process and with it WebKit's processes,
//! so the app idles in the tray without them.

use crate::bridge::{Call, Handlers, Link};
use cis2_core::autostart::{Autostart, AutostartState};
use serde_json::Value;
use tauri::{Emitter, Manager, Runtime, State};

#[tauri::command]
async fn view(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::View).await
}

#[tauri::command]
async fn login(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::Login).await
}

#[tauri::command]
async fn cancel_login(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::CancelLogin).await
}

#[tauri::command]
async fn change_role(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::ChangeRole).await
}

#[tauri::command]
async fn logout(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::Logout).await
}

#[tauri::command]
async fn answer_approval(link: State<'_, Link>, id: u64, answer: String) -> Result<Value, String> {
    link.call(Call::AnswerApproval { id, answer }).await
}

#[tauri::command]
async fn remembered_programs(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::RememberedPrograms).await
}

#[tauri::command]
async fn forget_program(link: State<'_, Link>, id: String) -> Result<Value, String> {
    link.call(Call::ForgetProgram { id }).await
}

#[tauri::command]
async fn drawn(link: State<'_, Link>) -> Result<Value, String> {
    link.call(Call::Drawn).await
}

// Start at sign-in is this person's desktop setting, not the agent's: answered here, in core.
#[tauri::command]
fn autostart(autostart: State<'_, Autostart>) -> AutostartState {
    autostart.state()
}

#[tauri::command]
fn set_autostart(autostart: State<'_, Autostart>, enabled: bool) -> Result<AutostartState, String> {
    autostart.set(enabled).map_err(|e| e.to_string())
}

/// The window's commands, for the real window and for the mock runtime in tests.
pub fn with_commands<R: Runtime>(builder: tauri::Builder<R>) -> tauri::Builder<R> {
    builder.invoke_handler(tauri::generate_handler![
        view,
        login,
        cancel_login,
        change_role,
        logout,
        answer_approval,
        remembered_programs,
        forget_program,
        drawn,
        autostart,
        set_autostart
    ])
}

fn to_front<R: Runtime>(app: &tauri::AppHandle<R>) {
    if let Some(window) = app.get_webview_window("main") {
        let _ = window.unminimize();
        let _ = window.show();
        let _ = window.set_focus();
    }
}

/// How long the window waits for the view the app sends first (it is in the pipe before this
/// process has started, so only a stuck app takes this long).
const FIRST_VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the window until it is closed or the app that started it is gone.
pub fn run() {
    tracing::debug!("window process started");
    let program = crate::program_to_start();
    let app = with_commands(tauri::Builder::default())
        .manage(Autostart::for_this_user(program))
        .setup(|app| {
            tracing::debug!("window process: GTK and Tauri up");
            let handle = app.handle().clone();
            let (first_view, first_view_heard) = tokio::sync::oneshot::channel();
            let first_view = std::sync::Mutex::new(Some(first_view));
            let (link, first_view) = tauri::async_runtime::block_on(async move {
                let (on_view, on_focus, on_closed) = (handle.clone(), handle.clone(), handle);
                let link = Link::connect(
                    tokio::io::stdin(),
                    tokio::io::stdout(),
                    Handlers {
                        view: Box::new(move |view| {
                            let first = first_view.lock().unwrap_or_else(|e| e.into_inner()).take();
                            match first {
                                Some(first) => {
                                    let _ = first.send(view);
                                }
                                None => {
                                    let _ = on_view.emit("view", view);
                                }
                            }
                        }),
                        focus: Box::new(move || to_front(&on_focus)),
                        closed: Box::new(move || on_closed.exit(0)),
                    },
                );
                // The app sends it as it starts this process; without it the page asks as before.
                let first_view = tokio::time::timeout(FIRST_VIEW_WAIT, first_view_heard)
                    .await
                    .ok()
                    .and_then(Result::ok);
                (link, first_view)
            });
            app.manage(link);
            // tauri.conf.json declares the window with `"create": false`: the app (tray) process
            // never makes one; this process does.
            let config = app
                .config()
                .app
                .windows
                .iter()
                .find(|w| w.label == "main")
                .cloned()
                .ok_or("tauri.conf.json has no window labelled main")?;
            let mut window = tauri::WebviewWindowBuilder::from_config(app.handle(), &config)?
                .on_page_load(|_, p| tracing::debug!(event = ?p.event(), "window page load"));
            if let Some(view) = first_view {
                // JSON is a JavaScript literal: the page's script finds the view already there.
                window =
                    window.initialization_script(format!("window.__CIS2_FIRST_VIEW__ = {view};"));
            }
            window.build()?;
            tracing::debug!("webview created");
            Ok(())
        })
        .build(crate::context())
        .expect("the window system could not start (is there a display?)");
    app.run(|_, _| {});
}
