//! Smartcard removal and insertion through a real `pcscd` with the virtual reader from Debian's
//! `vsmartcard-vpcd`, and cards emulated by `python3-virtualsmartcard` (tests/standins/card.py), against
//! `cis2-agentd` and `cis2ctl` as processes.
//!
//! pcscd always listens on /run/pcscd/pcscd.comm, so this file holds one test and needs no other pcscd
//! running; it starts its own with a reader configuration of its own (`pcscd -c`).

use cis2_system_tests::{Agent, Process, bin, json, stderr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Pcscd {
    child: Child,
    port: u16,
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn start_pcscd(dir: &Path) -> Pcscd {
    let pcscd = ["/usr/sbin/pcscd", "/usr/bin/pcscd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("pcscd is installed (scripts/test installs the Debian packages pcscd and vsmartcard-vpcd)");
    let driver = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
    assert!(
        Path::new(driver).exists(),
        "vpcd is installed (Debian vsmartcard-vpcd)"
    );
    let running = Command::new("pgrep").args(["-x", "pcscd"]).output();
    assert!(
        !running.is_ok_and(|o| o.status.success()),
        "another pcscd is running; pcscd has one fixed socket, so stop it for this test"
    );
    let port = free_port_pair();
    let conf = dir.join("reader.conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("vpcd"),
        format!(
            "FRIENDLYNAME \"Virtual PCD\"\nDEVICENAME /dev/null:0x{port:04X}\nLIBPATH {driver}\nCHANNELID 0x{port:04X}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/pcscd").ok();
    let child = Command::new(pcscd)
        .args(["--foreground", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "pcscd's vpcd reader did not open port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Pcscd { child, port }
}

fn card_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("standins/card.py")
}

/// Puts a card with `serial` into the virtual reader; dropping the Process takes it out.
fn insert(pcscd: &Pcscd, serial: &str) -> Process {
    let mut command = Command::new("/usr/bin/python3");
    command
        .arg(card_script())
        .arg(pcscd.port.to_string())
        .arg(serial);
    let mut card = Process::start(command);
    card.wait_for("inserted", Duration::from_secs(10));
    card
}

fn state(agent: &Agent) -> serde_json::Value {
    json(&agent.ctl(&["status", "--json"]))
}

fn wait_for_card(agent: &Agent, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(agent)["smartcard_present"] != present {
        assert!(
            Instant::now() < deadline,
            "the agent never saw the card {}",
            if present { "inserted" } else { "removed" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn card_removal_locks_the_same_card_unlocks_and_another_card_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let pcscd = start_pcscd(dir.path());
    let card_a = insert(&pcscd, "0A0A0A0A0A01");
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    wait_for_card(&agent, true);
    let login = agent.ctl(&["login"]);
    assert!(login.status.success(), "{}", stderr(&login));
    let mut watcher = {
        let mut command = Command::new(bin("cis2ctl"));
        command.arg("--socket").arg(&agent.socket).arg("watch");
        Process::start(command)
    };
    std::thread::sleep(Duration::from_millis(200));

    // Out: locked within a second; no token, no identity.
    let taken_out = Instant::now();
    drop(card_a);
    watcher.wait_for(
        "{\"reason\":\"the smartcard was removed\",\"type\":\"locked\"}",
        Duration::from_secs(5),
    );
    let took = taken_out.elapsed();
    eprintln!("card removed to clients told locked: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let status = state(&agent);
    assert_eq!(status["state"], "locked");
    assert!(status["user"].is_null());
    let token = agent.ctl(&["token"]);
    assert_eq!(token.status.code(), Some(1));
    assert!(
        stderr(&token).contains("put the same smartcard back"),
        "{}",
        stderr(&token)
    );

    // The same card back: unlocked, no browser.
    let opened = agent.browser_opened();
    let card_a = insert(&pcscd, "0A0A0A0A0A01");
    watcher.wait_for("{\"type\":\"unlocked\"}", Duration::from_secs(5));
    assert_eq!(state(&agent)["state"], "signed_in");
    assert!(agent.ctl(&["token"]).status.success());
    assert_eq!(agent.browser_opened(), opened, "no new sign-in");

    // Out again, and another clinician's card in: the session ends.
    drop(card_a);
    watcher.wait_for(
        "{\"reason\":\"the smartcard was removed\",\"type\":\"locked\"}",
        Duration::from_secs(5),
    );
    let _card_b = insert(&pcscd, "0B0B0B0B0B02");
    watcher.wait_for(
        "{\"reason\":\"another smartcard was inserted\",\"type\":\"signed_out\"}",
        Duration::from_secs(5),
    );
    assert_eq!(state(&agent)["state"], "signed_out");
}
