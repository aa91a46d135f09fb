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

/// A sandbox agent signed in, listening to a stand-in logind for the session's lock signals.
struct Desk {
    agent: Agent,
    bus: StandinLogind,
    _dir: tempfile::TempDir,
}

fn signed_in_on_a_desk(on_os_lock: &str, env: &[(&str, &str)]) -> Desk {
    let bus = StandinLogind::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("environment = \"sandbox\"\n[workstation]\non_os_lock = \"{on_os_lock}\"\n"),
    )
    .unwrap();
    let mut env = env.to_vec();
    env.push(("DBUS_SYSTEM_BUS_ADDRESS", bus.bus.address.as_str()));
    let agent = Agent::start(dir.path(), &["--config", config.to_str().unwrap()], &env);
    assert!(agent.ctl(&["login"]).status.success());
    Desk {
        agent,
        bus,
        _dir: dir,
    }
}

#[test]
fn an_os_lock_locks_the_session_within_a_second_and_only_the_clinician_unlocks_it() {
    let Desk { agent, bus, .. } = &signed_in_on_a_desk("lock", &[]);
    let mut watcher = {
        let mut command = Command::new(cis2_system_tests::bin("cis2ctl"));
        command.arg("--socket").arg(&agent.socket).arg("watch");
        Process::start(command)
    };
    std::thread::sleep(Duration::from_millis(200));
    bus.emit("EmitLock");
    let took = within(Duration::from_secs(1), agent, "locked").expect("locked within 1 second");
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
    assert_eq!(state(agent), "locked");
    // The same clinician signing in again does.
    assert!(agent.ctl(&["login"]).status.success());
    assert_eq!(state(agent), "signed_in");
    watcher.wait_for("{\"type\":\"unlocked\"}", Duration::from_secs(5));
}

#[test]
fn with_sign_out_configured_an_os_lock_ends_the_session() {
    let Desk { agent, bus, .. } = &signed_in_on_a_desk("sign_out", &[]);
    bus.emit("EmitLock");
    within(Duration::from_secs(1), agent, "signed_out").expect("signed out within 1 second");
}

#[test]
fn a_token_read_before_a_lock_is_not_handed_out_after_it() {
    // Each token answer is held 2 s after it is read, so the lock lands between reading and sending.
    let Desk { agent, bus, .. } =
        &signed_in_on_a_desk("lock", &[("CIS2_TEST_PAUSE_TOKEN_MS", "2000")]);
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"token\"}\n",
    )
    .unwrap();
    // Give the agent time to read the token (well inside the 2 s hold) before the lock.
    std::thread::sleep(Duration::from_millis(300));
    bus.emit("EmitLock");
    within(Duration::from_secs(1), agent, "locked").expect("locked within 1 second");
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    // (The answer is not printed here: it would hold the token.)
    assert!(
        answer["result"].is_null(),
        "a token was handed out after the lock"
    );
    assert_eq!(answer["error"]["code"], -32004, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workstation was locked"),
        "{answer}"
    );
}
