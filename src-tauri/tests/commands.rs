//! Every command of the window, through Tauri's mock runtime and its real IPC path (origin
//! `tauri://localhost`, as on Linux), carried by the real bridge protocol (over an in-memory pipe
//! here, the window process's stdin and stdout in the app) to an agent in this process signing in
//! at the embedded sandbox provider with a scripted browser.

use cis2_agent_app::bridge::{Handlers, Link, ToWindow, serve_window};
use cis2_agent_app::with_commands;
use cis2_core::agent::{Agent, AgentOptions};
use cis2_core::autostart::Autostart;
use cis2_core::browser::Browser;
use cis2_core::desktop::{Approvals, Desktop, View};
use cis2_core::peer::Peer;
use cis2_core::policy::{Answer, Approver, Decisions};
use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tauri::ipc::{CallbackFn, InvokeBody};
use tauri::test::{
    INVOKE_KEY, MockRuntime, get_ipc_response, mock_builder, mock_context, noop_assets,
};
use tauri::webview::InvokeRequest;
use tauri::{App, WebviewWindow};

struct Harness {
    _app: App<MockRuntime>,
    window: WebviewWindow<MockRuntime>,
    desktop: Desktop,
    opened: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
    /// What the app sends the window besides answers (as the tray process does on each change).
    to_window: tokio::sync::mpsc::UnboundedSender<ToWindow>,
    views_heard: Arc<Mutex<Vec<Value>>>,
    focused: Arc<AtomicUsize>,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "environment = \"sandbox\"\n[agent]\ndata_dir = \"{}\"\nclient_policy = \"ask\"\n",
        dir.path().join("data").display()
    );
    let config = cis2_core::config::parse(&text, &dir.path().join("config.toml")).unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let browser = {
        let opened = opened.clone();
        Browser::Callback(Arc::new(move |url: &str| {
            opened.fetch_add(1, Ordering::SeqCst);
            let url = url.to_string();
            tauri::async_runtime::spawn(async move {
                let _ = ScriptedBrowser::default()
                    .sign_in(&url, &Script::new("555021935107", "smartcard"))
                    .await;
            });
        }))
    };
    let approvals = Arc::new(Approvals::default());
    let mut options = AgentOptions::new(config, browser);
    options.approver = Some(approvals.clone());
    let agent = tauri::async_runtime::block_on(Agent::start(options)).unwrap();
    let desktop = Desktop { agent, approvals };
    let (window_end, app_end) = tokio::io::duplex(1 << 16);
    let (from_window, to_window_pipe) = tokio::io::split(app_end);
    let (from_app, to_app) = tokio::io::split(window_end);
    let (to_window, outgoing) = tokio::sync::mpsc::unbounded_channel();
    tauri::async_runtime::spawn(serve_window(
        desktop.clone(),
        from_window,
        to_window_pipe,
        to_window.clone(),
        outgoing,
        || {},
    ));
    let views_heard = Arc::new(Mutex::new(Vec::new()));
    let focused = Arc::new(AtomicUsize::new(0));
    let handlers = Handlers {
        view: Box::new({
            let views_heard = views_heard.clone();
            move |view| views_heard.lock().unwrap().push(view)
        }),
        focus: Box::new({
            let focused = focused.clone();
            move || {
                focused.fetch_add(1, Ordering::SeqCst);
            }
        }),
        closed: Box::new(|| {}),
    };
    let link = tauri::async_runtime::block_on(async { Link::connect(from_app, to_app, handlers) });
    let autostart = Autostart::with_dirs(
        dir.path().join("home/.config/autostart"),
        vec![dir.path().join("etc/xdg/autostart")],
        "/usr/bin/cis2-agent".into(),
    );
    let app = with_commands(mock_builder())
        .manage(link)
        .manage(autostart)
        .build(mock_context(noop_assets()))
        .unwrap();
    let window = tauri::WebviewWindowBuilder::new(&app, "main", Default::default())
        .build()
        .unwrap();
    Harness {
        _app: app,
        window,
        desktop,
        opened,
        dir,
        to_window,
        views_heard,
        focused,
    }
}

impl Harness {
    fn call(&self, cmd: &str, args: Value) -> Result<Value, Value> {
        get_ipc_response(
            &self.window,
            InvokeRequest {
                cmd: cmd.into(),
                callback: CallbackFn(0),
                error: CallbackFn(1),
                url: "tauri://localhost".parse().unwrap(),
                body: InvokeBody::Json(args),
                headers: Default::default(),
                invoke_key: INVOKE_KEY.to_string(),
            },
        )
        .map(|body| body.deserialize::<Value>().unwrap())
    }

    fn view(&self) -> Value {
        self.call("view", json!({})).unwrap()
    }
}

#[test]
fn view_login_change_role_and_logout() {
    let h = harness();
    let view = h.view();
    assert_eq!(view["state"], "signed_out");
    assert_eq!(view["sandbox"], true);
    assert!(view["name"].is_null());

    let signed_in = h.call("login", json!({})).unwrap();
    assert_eq!(signed_in["state"], "signed_in");
    assert_eq!(signed_in["uid"], "555021935107");
    assert_eq!(signed_in["roles"].as_array().unwrap().len(), 3);
    assert_eq!(signed_in["authenticated_with"], "Smartcard");
    assert_eq!(signed_in["assurance"], "AAL3");
    assert!(signed_in["seconds_left"].as_u64().unwrap() > 3600);
    assert_eq!(h.opened.load(Ordering::SeqCst), 1);
    // The command hands the window exactly the core's view.
    let from_core: View = h.desktop.view();
    assert_eq!(
        h.view()["role"],
        serde_json::to_value(&from_core.role).unwrap()
    );

    // The button again, with someone signed in: a switch of clinician, refused with what to do.
    let refused = h.call("login", json!({})).unwrap_err();
    assert!(
        refused.as_str().unwrap().contains("sign out first"),
        "{refused}"
    );
    assert_eq!(h.opened.load(Ordering::SeqCst), 1);

    let changed = h.call("change_role", json!({})).unwrap();
    assert_eq!(changed["state"], "signed_in");
    assert!(changed["role"]["id"].is_string());
    assert_eq!(
        h.opened.load(Ordering::SeqCst),
        2,
        "the role picker opened in the browser"
    );

    let out = h.call("logout", json!({})).unwrap();
    assert_eq!(out["state"], "signed_out");
    assert!(out["uid"].is_null());
}

#[test]
fn cancel_login_with_nothing_under_way_changes_nothing() {
    let h = harness();
    let view = h.call("cancel_login", json!({})).unwrap();
    assert_eq!(view["state"], "signed_out");
}

#[test]
fn an_approval_prompt_is_listed_and_answered_through_the_window() {
    let h = harness();
    let peer = Peer {
        uid: 1000,
        pid: Some(4242),
        exe: Some("/opt/ward-ehr/bin/ward-ehr".into()),
        sha256: Some("cd".repeat(32)),
        ..Peer::default()
    };
    let approvals = h.desktop.approvals.clone();
    let asked = tauri::async_runtime::spawn(async move { approvals.ask(&peer).await });
    let prompt = loop {
        let view = h.view();
        if let Some(first) = view["approvals"].as_array().and_then(|a| a.first()) {
            break first.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(prompt["program"], "ward-ehr");
    assert_eq!(prompt["path"], "/opt/ward-ehr/bin/ward-ehr");
    let id = prompt["id"].as_u64().unwrap();
    let bad = h
        .call("answer_approval", json!({"id": id, "answer": "maybe"}))
        .unwrap_err();
    assert!(bad.as_str().unwrap().contains("unknown answer"));
    let view = h
        .call("answer_approval", json!({"id": id, "answer": "deny"}))
        .unwrap();
    assert!(view["approvals"].as_array().unwrap().is_empty());
    assert_eq!(tauri::async_runtime::block_on(asked).unwrap(), Answer::Deny);
    let gone = h
        .call("answer_approval", json!({"id": id, "answer": "allow-once"}))
        .unwrap_err();
    assert!(gone.as_str().unwrap().contains("no longer waiting"));
}

#[test]
fn remembered_programs_are_listed_and_forgotten() {
    let h = harness();
    assert_eq!(h.call("remembered_programs", json!({})).unwrap(), json!([]));
    let decisions = Decisions::new(h.dir.path().join("data").join("clients.json"));
    decisions
        .remember(
            &Peer {
                uid: 1000,
                pid: None,
                exe: Some("/opt/ward-ehr/bin/ward-ehr".into()),
                sha256: Some("ef".repeat(32)),
                ..Peer::default()
            },
            true,
        )
        .unwrap();
    let listed = h.call("remembered_programs", json!({})).unwrap();
    assert_eq!(listed[0]["path"], "/opt/ward-ehr/bin/ward-ehr");
    assert_eq!(listed[0]["allow"], true);
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        h.call("forget_program", json!({"id": id})).unwrap(),
        json!([])
    );
    let missing = h.call("forget_program", json!({"id": id})).unwrap_err();
    assert!(missing.as_str().unwrap().contains("No remembered program"));
}

#[test]
fn the_tray_tooltip_names_the_clinician_and_role() {
    let h = harness();
    assert_eq!(
        cis2_agent_app::tray_tooltip(&h.desktop.view()),
        "CIS2 Agent (SANDBOX): signed out"
    );
    h.call("login", json!({})).unwrap();
    let tooltip = cis2_agent_app::tray_tooltip(&h.desktop.view());
    assert!(
        tooltip.starts_with("CIS2 Agent (SANDBOX): Amelia"),
        "{tooltip}"
    );
    assert!(tooltip.contains(", "), "{tooltip}");
}

#[test]
fn views_and_focus_from_the_app_reach_the_window() {
    let h = harness();
    h.call("login", json!({})).unwrap();
    let view = serde_json::to_value(h.desktop.view()).unwrap();
    h.to_window
        .send(ToWindow::View { view: view.clone() })
        .unwrap();
    h.to_window.send(ToWindow::Focus).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.focused.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no focus arrived");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // In order: the view went before the focus.
    assert_eq!(h.views_heard.lock().unwrap().as_slice(), &[view]);
}

#[test]
fn start_at_sign_in_is_turned_on_and_off_from_the_settings_page() {
    let h = harness();
    let entry = h
        .dir
        .path()
        .join("home/.config/autostart/cis2-agent.desktop");
    assert_eq!(
        h.call("autostart", json!({})).unwrap(),
        json!({"enabled": false, "machine_wide": false, "changeable": true})
    );
    let on = h.call("set_autostart", json!({"enabled": true})).unwrap();
    assert_eq!(
        on,
        json!({"enabled": true, "machine_wide": false, "changeable": true})
    );
    let text = std::fs::read_to_string(&entry).unwrap();
    assert!(
        text.contains("Exec=\"/usr/bin/cis2-agent\" --minimized"),
        "{text}"
    );
    assert_eq!(h.call("autostart", json!({})).unwrap(), on);
    let off = h.call("set_autostart", json!({"enabled": false})).unwrap();
    assert_eq!(off["enabled"], false);
    assert!(!entry.exists());
    // Bad input: a clear refusal, nothing changed.
    assert!(h.call("set_autostart", json!({"enabled": "yes"})).is_err());
    assert!(!entry.exists());
}
