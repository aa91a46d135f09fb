//! Signals from the workstation that a clinician walked away. On Linux: logind's `Lock` and `Unlock`
//! for this login session, over the system D-Bus (`$DBUS_SYSTEM_BUS_ADDRESS` when set, as in tests).
//! What a lock does is `[workstation] on_os_lock`: ignore, lock the agent's session, or sign out. An OS
//! unlock never unlocks the agent: that needs the same clinician to sign in again.
//!
//! On Windows: WTS session notifications (lock, unlock, logoff, switch user) on a message-only window.
//! macOS (screen-lock notifications) is not wired yet.

use crate::agent::Agent;
use crate::config::SignalAction;

/// What the OS said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsSignal {
    Locked,
    Unlocked,
}

/// Applies `on_os_lock` to a signal.
pub async fn apply(agent: &Agent, signal: OsSignal) {
    let action = agent.config().workstation.on_os_lock;
    match (signal, action) {
        (OsSignal::Locked, SignalAction::Lock) => agent.lock(crate::agent::LockReason::Workstation),
        (OsSignal::Locked, SignalAction::SignOut) => {
            agent.sign_out_for("the workstation was locked").await;
        }
        (OsSignal::Locked, SignalAction::Ignore) => {}
        (OsSignal::Unlocked, _) => {
            tracing::info!("the workstation was unlocked; the agent's session stays as it is");
        }
    }
}

/// Watches logind for this session in a thread of its own and applies each signal. Returns why it
/// cannot, when it cannot (no system bus, no logind): the agent then runs without OS lock signals.
#[cfg(target_os = "linux")]
pub fn watch(agent: Agent) -> Result<(), String> {
    use dbus::blocking::Connection;
    use dbus::message::MatchRule;
    use std::time::Duration;

    if agent.config().workstation.on_os_lock == SignalAction::Ignore {
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<OsSignal>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
    std::thread::Builder::new()
        .name("cis2-logind".into())
        .spawn(move || {
            let setup = || -> Result<(Connection, dbus::Path<'static>), String> {
                let conn =
                    Connection::new_system().map_err(|e| format!("no system D-Bus ({e})"))?;
                let manager = conn.with_proxy(
                    "org.freedesktop.login1",
                    "/org/freedesktop/login1",
                    Duration::from_secs(5),
                );
                let (path,): (dbus::Path<'static>,) = manager
                    .method_call(
                        "org.freedesktop.login1.Manager",
                        "GetSessionByPID",
                        (std::process::id(),),
                    )
                    .map_err(|e| format!("logind does not know this process's session ({e})"))?;
                for (member, signal) in [("Lock", OsSignal::Locked), ("Unlock", OsSignal::Unlocked)]
                {
                    let tx = tx.clone();
                    let rule = MatchRule::new_signal("org.freedesktop.login1.Session", member)
                        .with_path(path.clone());
                    conn.add_match(rule, move |_: (), _, _| tx.send(signal).is_ok())
                        .map_err(|e| format!("cannot listen to logind ({e})"))?;
                }
                Ok((conn, path))
            };
            match setup() {
                Ok((conn, path)) => {
                    let _ = ready_tx.send(Ok(path.to_string()));
                    while conn.process(Duration::from_millis(500)).is_ok() {}
                    tracing::warn!("the system D-Bus connection ended; OS lock signals stop");
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let session = ready_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .map_err(|_| "logind did not answer".to_string())??;
    tracing::info!(%session, "watching logind for workstation lock");
    tokio::spawn(async move {
        while let Some(signal) = rx.recv().await {
            tracing::info!(?signal, "workstation signal");
            apply(&agent, signal).await;
        }
    });
    Ok(())
}

/// Windows: the session notifications of a message-only window (cis2-os's `session`): lock, logoff and
/// switch user count as the workstation being locked; unlock as unlocked.
#[cfg(windows)]
pub fn watch(agent: Agent) -> Result<(), String> {
    use cis2_os::session::{SessionEvent, SessionWatch};

    if agent.config().workstation.on_os_lock == SignalAction::Ignore {
        return Ok(());
    }
    let (events_tx, events_rx) = std::sync::mpsc::channel::<SessionEvent>();
    let watch = SessionWatch::start(events_tx)
        .map_err(|e| format!("cannot register for session notifications ({e})"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<OsSignal>();
    std::thread::Builder::new()
        .name("cis2-session".into())
        .spawn(move || {
            let _watch = watch;
            for event in events_rx {
                let signal = match event {
                    SessionEvent::Lock | SessionEvent::Logoff | SessionEvent::Disconnect => {
                        OsSignal::Locked
                    }
                    SessionEvent::Unlock => OsSignal::Unlocked,
                    SessionEvent::Other(_) => continue,
                };
                if tx.send(signal).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    tracing::info!("watching Windows session notifications for workstation lock");
    tokio::spawn(async move {
        while let Some(signal) = rx.recv().await {
            tracing::info!(?signal, "workstation signal");
            apply(&agent, signal).await;
        }
    });
    Ok(())
}

#[cfg(not(any(target_os = "linux", windows)))]
pub fn watch(_agent: Agent) -> Result<(), String> {
    Err("OS lock signals are only wired on Linux and Windows in this build".into())
}
