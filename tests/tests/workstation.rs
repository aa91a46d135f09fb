//! Workstation lock through a real D-Bus: a private bus with a stand-in logind (tests/standins/logind.py)
//! that emits the session's Lock and Unlock signals; the agent listens with the code that listens to
//! the real logind, only the bus address differs.

use cis2_system_tests::{Agent, Process, StandinLogind, json, stderr};
use std::process::Command;
use std::time::{Duration, Instant};

fn state(agent: &Agent) -> String {
    json(&agent.ctl(&["status", "--json"]))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn within(limit: Duration, agent: &Agent, wanted: &str) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if state(agent) == wanted {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn an_os_lock_locks_the_session_within_a_second_and_only_the_clinician_unlocks_it() {
    let bus = StandinLogind::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "environment = \"sandbox\"\n[workstation]\non_os_lock = \"lock\"\n",
    )
    .unwrap();
    let agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.bus.address.as_str())],
    );
    assert!(agent.ctl(&["login"]).status.success());
    let mut watcher = {
        let mut command = Command::new(cis2_system_tests::bin("cis2ctl"));
        command.arg("--socket").arg(&agent.socket).arg("watch");
        Process::start(command)
    };
    std::thread::sleep(Duration::from_millis(200));
    bus.emit("EmitLock");
    let took = within(Duration::from_secs(1), &agent, "locked").expect("locked within 1 second");
    eprintln!("OS lock to agent locked: {took:?}");
    let status = json(&agent.ctl(&["status", "--json"]));
    assert!(
        status["locked_reason"]
            .as_str()
            .unwrap()
            .contains("workstation was locked")
    );
    assert!(status["user"].is_null(), "no identity while locked");
    let token = agent.ctl(&["token"]);
    assert_eq!(token.status.code(), Some(1));
    assert!(stderr(&token).contains("locked"), "{}", stderr(&token));
    watcher.wait_for(
        "{\"reason\":\"the workstation was locked\",\"type\":\"locked\"}",
        Duration::from_secs(5),
    );
    // The OS unlock alone does not unlock the agent.
    bus.emit("EmitUnlock");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&agent), "locked");
    // The same clinician signing in again does.
    assert!(agent.ctl(&["login"]).status.success());
    assert_eq!(state(&agent), "signed_in");
    watcher.wait_for("{\"type\":\"unlocked\"}", Duration::from_secs(5));
}

#[test]
fn with_sign_out_configured_an_os_lock_ends_the_session() {
    let bus = StandinLogind::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "environment = \"sandbox\"\n[workstation]\non_os_lock = \"sign_out\"\n",
    )
    .unwrap();
    let agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("DBUS_SYSTEM_BUS_ADDRESS", bus.bus.address.as_str())],
    );
    assert!(agent.ctl(&["login"]).status.success());
    bus.emit("EmitLock");
    within(Duration::from_secs(1), &agent, "signed_out").expect("signed out within 1 second");
}
