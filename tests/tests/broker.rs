//! The local broker as processes: clients identified by their executable's hash, the client policy and
//! remembered decisions, the audit trail and its tamper detection, single-flight sign-in across
//! processes, and load.

use cis2_system_tests::{Agent, bin, ctl, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A sandbox agent with `policy_toml` appended to its config; returns the agent and its data folder.
fn sandbox_with(dir: &Path, policy_toml: &str) -> (Agent, PathBuf) {
    let data = dir.join("data");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"sandbox\"\n[agent]\ndata_dir = \"{}\"\n{policy_toml}",
            data.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(dir, &["--config", config.to_str().unwrap()], &[]);
    (agent, data)
}

fn copy_of_cis2ctl(dir: &Path, name: &str, modify: bool) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = std::fs::read(bin("cis2ctl")).unwrap();
    if modify {
        // Trailing bytes leave the ELF runnable but change its hash: a tampered build.
        bytes.extend_from_slice(b"tampered");
    }
    std::fs::write(&path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn run(program: &Path, socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn clients_are_known_by_their_executables_hash_not_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let hash = sha256_of(&bin("cis2ctl"));
    let (agent, _) = sandbox_with(
        dir.path(),
        &format!(
            "client_policy = \"deny\"\n[[clients]]\nname = \"cis2ctl\"\nsha256 = \"{hash}\"\nmethods = [\"status\", \"login\", \"whoami\", \"token\"]\n"
        ),
    );
    assert_eq!(agent.ctl(&["login"]).status.code(), Some(0));
    let copy = copy_of_cis2ctl(dir.path(), "ward-ehr", false);
    let copied = run(&copy, &agent.socket, &["whoami", "--json"]);
    assert_eq!(
        copied.status.code(),
        Some(0),
        "a copy under another name is the same client: {}",
        stderr(&copied)
    );
    let tampered = copy_of_cis2ctl(dir.path(), "ward-ehr-modified", true);
    let refused = run(&tampered, &agent.socket, &["whoami"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert!(message.contains("client_policy is \"deny\""), "{message}");
    assert!(
        message.contains(&format!("path = \"{}\"", tampered.display())),
        "the message says what to add: {message}"
    );
    assert!(message.contains("sha256 = \""), "{message}");
    // status is answered for everyone of this user; methods outside the rule are not.
    assert_eq!(
        run(&tampered, &agent.socket, &["status"]).status.code(),
        Some(0)
    );
    let logout = agent.ctl(&["logout"]);
    assert_eq!(
        logout.status.code(),
        Some(1),
        "logout is not in this client's methods"
    );
    assert!(
        stderr(&logout).contains("may not call logout"),
        "{}",
        stderr(&logout)
    );
}

#[test]
fn ask_without_a_gui_refuses_and_names_the_setting_and_remembered_decisions_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, data) = sandbox_with(dir.path(), "client_policy = \"ask\"\n");
    let refused = agent.ctl(&["whoami"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert!(
        message.contains("no one to ask") && message.contains("client_policy = \"allow\""),
        "{message}"
    );
    assert!(message.contains(&sha256_of(&bin("cis2ctl"))), "{message}");

    // A decision remembered by the desktop app's prompt ("Always allow"), keyed by hash.
    let hash = sha256_of(&bin("cis2ctl"));
    std::fs::write(
        data.join("clients.json"),
        serde_json::json!([{"id": &hash[..12], "path": bin("cis2ctl"), "sha256": hash, "allow": true, "decided_at": "2026-12-01T00:00:00Z"}]).to_string(),
    )
    .unwrap();
    let cfg = ["--config", dir.path().join("config.toml").to_str().unwrap()].map(str::to_string);
    let listed = ctl(
        &agent.socket,
        &[cfg[0].as_str(), cfg[1].as_str(), "clients"],
    );
    assert!(
        stdout(&listed).contains(&hash[..12]) && stdout(&listed).contains("allowed"),
        "{}",
        stdout(&listed)
    );
    assert_eq!(agent.ctl(&["login"]).status.code(), Some(0));
    assert_eq!(agent.ctl(&["whoami"]).status.code(), Some(0));
    let revoke = ctl(
        &agent.socket,
        &[
            cfg[0].as_str(),
            cfg[1].as_str(),
            "clients",
            "revoke",
            &hash[..12],
        ],
    );
    assert_eq!(revoke.status.code(), Some(0), "{}", stderr(&revoke));
    // The running agent sees the revocation at once.
    assert_eq!(agent.ctl(&["whoami"]).status.code(), Some(1));
    let again = ctl(
        &agent.socket,
        &[
            cfg[0].as_str(),
            cfg[1].as_str(),
            "clients",
            "revoke",
            &hash[..12],
        ],
    );
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn the_audit_trail_records_every_request_without_tokens_and_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, data) = sandbox_with(dir.path(), "");
    assert_eq!(agent.ctl(&["login"]).status.code(), Some(0));
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert_eq!(agent.ctl(&["whoami"]).status.code(), Some(0));
    assert_eq!(agent.ctl(&["logout"]).status.code(), Some(0));
    assert_eq!(agent.ctl(&["token"]).status.code(), Some(1));
    let log = data.join("audit.jsonl");
    let cfg = dir.path().join("config.toml");
    let cfg = cfg.to_str().unwrap();
    // Records are written in the background; wait for all five.
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let methods: Vec<&str> = records
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, vec!["login", "token", "whoami", "logout", "token"]);
    assert_eq!(records[1]["outcome"], "ok");
    assert_eq!(records[1]["uid"], "555021935107");
    assert_eq!(
        records[1]["client"]["path"],
        bin("cis2ctl").to_str().unwrap()
    );
    assert_eq!(records[1]["client"]["sha256"], sha256_of(&bin("cis2ctl")));
    assert!(records[1]["client"]["pid"].as_i64().unwrap() > 0);
    assert_eq!(records[4]["outcome"], "error -32001");
    assert!(!text.contains(&token), "no token in the audit log");

    let verify = ctl(&agent.socket, &["--config", cfg, "audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
    assert!(stdout(&verify).contains("intact, 5 records"));
    let tail = ctl(
        &agent.socket,
        &["--config", cfg, "audit", "tail", "-n", "2"],
    );
    assert_eq!(stdout(&tail).lines().count(), 2);

    let original = text.clone();
    // The head file may lag the log by up to 100 ms (it is rewritten at most that often): the
    // tampering checks below need it to name the last line.
    let head = format!("{}.head", log.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read(&head)
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .and_then(|h| h["lines"].as_u64())
        != Some(records.len() as u64)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the head file never caught up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let check = |content: String, line: usize| {
        let copy = dir.path().join("tampered.jsonl");
        std::fs::write(&copy, content).unwrap();
        let head = format!("{}.head", log.display());
        std::fs::copy(&head, format!("{}.head", copy.display())).unwrap();
        let out = ctl(
            &agent.socket,
            &["audit", "verify", "--file", copy.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).contains(&format!("line {line}:")),
            "{}",
            stdout(&out)
        );
    };
    let lines: Vec<&str> = original.lines().collect();
    check(
        original.replacen("\"outcome\":\"error -32001\"", "\"outcome\":\"ok\"", 1),
        5,
    );
    check(
        lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| format!("{l}\n"))
            .collect(),
        2,
    );
    check(lines[..3].iter().map(|l| format!("{l}\n")).collect(), 4);
}

#[test]
fn twenty_programs_logging_in_at_once_open_the_browser_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    // Twenty programs (not a person at cis2ctl: that would be a request to switch clinician) ask for
    // a sign-in at the same moment.
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                let mut client = cis2_ipc_client::Client::connect(&socket).unwrap();
                client.call("login", serde_json::json!({})).unwrap()
            })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.join().unwrap()["state"], "signed_in");
    }
    assert_eq!(agent.browser_opened(), 1);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn hammer(socket: &Path, clients: usize, calls: usize, expected: &str) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_path_buf();
            let expected = expected.to_string();
            std::thread::spawn(move || {
                let mut client = cis2_ipc_client::Client::connect(&socket).unwrap();
                client.set_timeout(Some(Duration::from_secs(60))).unwrap();
                for _ in 0..calls {
                    let answer = client.call("token", serde_json::json!({})).unwrap();
                    assert_eq!(answer["access_token"], expected.as_str());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("every call answered correctly");
    }
}

/// Fifty connections of one program (the agent allows one program 64 at once, so that it cannot
/// take every slot), four thousand calls each.
#[test]
fn fifty_clients_times_four_thousand_token_calls_all_answered_and_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, data) = sandbox_with(dir.path(), "");
    assert_eq!(agent.ctl(&["login"]).status.code(), Some(0));
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    let pid = agent.process.child.id();
    hammer(&agent.socket, 50, 400, &token);
    std::thread::sleep(Duration::from_millis(500));
    let warmed = rss_kib(pid);
    hammer(&agent.socket, 50, 3600, &token);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    eprintln!("agent RSS after 20,000 calls: {warmed} KiB; after 200,000: {after} KiB");
    assert!(
        after < warmed + 8 * 1024,
        "memory grew from {warmed} KiB to {after} KiB"
    );
    // Nothing lost: every call is in the audit log (written in the background; give it a moment).
    let mut lines = 0;
    for _ in 0..200 {
        lines = std::fs::read_to_string(data.join("audit.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 200_002 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lines, 200_002, "login + token + 200,000 token calls");
}
