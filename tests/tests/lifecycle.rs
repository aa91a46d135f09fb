//! The session's life across processes: the real Secret Service (a private D-Bus with GNOME Keyring),
//! restart after `kill -9`, crash safety at each step of a refresh-token rotation, the keychain missing,
//! provider faults as a client sees them, and no token anywhere it should not be.

use cis2_system_tests::{Agent, Process, SecretService, bin, json, stderr, stdout};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

struct Setup {
    _idp: Process,
    issuer: String,
    config: String,
}

/// A provider process with a public client (rotating refresh tokens) and a keyring-store config.
fn setup(dir: &Path, store: &str, access_token_ttl: u64) -> Setup {
    let clients = dir.join("clients.toml");
    std::fs::write(
        &clients,
        "[[clients]]\nclient_id = \"life.apps.national\"\nauth_method = \"none\"\nredirect_uris = [\"http://127.0.0.1/callback\"]\nrefresh_tokens = true\nrotate_refresh_tokens = true\n",
    )
    .unwrap();
    let mut command = Command::new(bin("cis2-mock-idp"));
    command
        .args([
            "--port",
            "0",
            "--access-token-ttl",
            &access_token_ttl.to_string(),
            "--clients",
        ])
        .arg(&clients);
    let mut idp = Process::start(command);
    let issuer = format!(
        "http://{}",
        idp.wait_for("http://", Duration::from_secs(30))
    );
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"life.apps.national\"\n\
             [provider.exchange]\nmethod = \"none\"\n[agent]\nclient_policy = \"allow\"\nstore = \"{store}\"\ndata_dir = \"{}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    Setup {
        _idp: idp,
        issuer,
        config: config.to_str().unwrap().to_string(),
    }
}

fn start(dir: &Path, s: &Setup, keyring: &SecretService, extra: &[(&str, &str)]) -> Agent {
    let mut env = vec![("DBUS_SESSION_BUS_ADDRESS", keyring.address.as_str())];
    env.extend_from_slice(extra);
    Agent::start(dir, &["--config", &s.config], &env)
}

fn kill_9(agent: &mut Agent) {
    let _ = Command::new("kill")
        .args(["-9", &agent.process.child.id().to_string()])
        .status();
    let _ = agent.process.child.wait();
}

#[test]
fn kill_9_then_restart_restores_the_session_from_the_real_keychain() {
    let keyring = SecretService::start();
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), "keyring", 3600);
    let mut agent = start(dir.path(), &s, &keyring, &[]);
    let status = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(status["store"]["kind"], "keyring", "{status}");
    assert!(agent.ctl(&["login"]).status.success());
    let token = stdout(&agent.ctl(&["token"]));
    assert!(dir.path().join("data/session.bin").exists());
    kill_9(&mut agent);

    let again = start(dir.path(), &s, &keyring, &[]);
    let whoami = again.ctl(&["whoami", "--json"]);
    assert_eq!(whoami.status.code(), Some(0), "{}", stderr(&whoami));
    assert_eq!(json(&whoami)["uid"], "555021935107");
    assert_eq!(
        stdout(&again.ctl(&["token"])),
        token,
        "the same cached token"
    );
    assert_eq!(
        again.browser_opened(),
        1,
        "the browser was opened once, before the restart"
    );
    let _ = &s.issuer;
}

/// Polls until `check` holds (the agent's timers run on the wall clock here).
fn eventually(seconds: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn killed_at_each_step_of_a_refresh_rotation_the_session_is_usable_or_cleanly_signed_out() {
    let keyring = SecretService::start();
    for step in ["after_refresh_answer", "after_refresh_saved"] {
        let dir = tempfile::tempdir().unwrap();
        // Tokens of 4 s, shorter than twice the 60 s margin: the agent renews by itself at half
        // their life, ~2 s after sign-in.
        let s = setup(dir.path(), "keyring", 4);
        let mut agent = start(dir.path(), &s, &keyring, &[("CIS2_TEST_CRASH_AT", step)]);
        assert!(agent.ctl(&["login"]).status.success());
        let died = eventually(15, || {
            agent.process.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            died,
            "{step}: the agent died mid-refresh, as a power cut would"
        );

        let again = start(dir.path(), &s, &keyring, &[]);
        let status = json(&again.ctl(&["status", "--json"]));
        assert_eq!(
            status["state"], "signed_in",
            "{step}: restored from the last saved state: {status}"
        );
        assert_eq!(again.ctl(&["whoami"]).status.code(), Some(0), "{step}");
        match step {
            // The provider rotated the refresh token but the agent died before saving it: the old one
            // is refused at the next renewal and the session ends cleanly.
            "after_refresh_answer" => {
                let ended = eventually(15, || {
                    json(&again.ctl(&["status", "--json"]))["state"] == "signed_out"
                });
                assert!(ended, "{step}: cleanly signed out");
            }
            // Saved before dying: the renewed session carries on, renewing again.
            _ => {
                let first = stdout(&again.ctl(&["token"]));
                let renewed = eventually(15, || {
                    let now = again.ctl(&["token"]);
                    now.status.success() && stdout(&now) != first
                });
                assert!(renewed, "{step}: the saved refresh token still works");
            }
        }
        // Either way the agent can sign in again: nothing was left corrupted.
        assert!(again.ctl(&["logout"]).status.success());
        assert!(again.ctl(&["login"]).status.success());
        assert_eq!(again.ctl(&["whoami"]).status.code(), Some(0));
    }
}

#[test]
fn without_a_keychain_the_agent_says_so_and_keeps_the_session_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), "keyring", 3600);
    let nowhere = format!("unix:path={}", dir.path().join("no-bus").display());
    let agent = Agent::start(
        dir.path(),
        &["--config", &s.config],
        &[("DBUS_SESSION_BUS_ADDRESS", &nowhere)],
    );
    let status = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(status["store"]["kind"], "memory", "{status}");
    assert!(
        status["store"]["warning"]
            .as_str()
            .unwrap()
            .contains("keyring"),
        "{status}"
    );
    assert!(agent.ctl(&["login"]).status.success());
    assert!(
        !dir.path().join("data/session.bin").exists(),
        "never plaintext, never a file"
    );
}

#[test]
fn provider_faults_as_a_client_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    // 62 s tokens: renewed at half life in the background; `--min-valid 61` makes each client
    // call need a renewal at once.
    let s = setup(dir.path(), "memory", 62);
    let agent = Agent::start(dir.path(), &["--config", &s.config], &[]);
    assert!(agent.ctl(&["login"]).status.success());
    let admin = s.issuer.split("/openam").next().unwrap().to_string() + "/admin";
    let post = |path: &str, body: &str| {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ])
            .arg(format!("{admin}{path}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "admin {path}");
    };
    for (mode, expect) in [
        ("error500", "HTTP 500"),
        ("malformed", "not the expected JSON"),
        ("hang", "did not answer"),
    ] {
        post(
            "/faults",
            &format!("{{\"endpoint\": \"token\", \"mode\": \"{mode}\"}}"),
        );
        std::thread::sleep(Duration::from_millis(2100));
        let cached = agent.ctl(&["token"]);
        // The cached token is still served while it lasts…
        assert_eq!(cached.status.code(), Some(0), "{mode}: {}", stderr(&cached));
        // …and a client that needs a fresher one gets -32005 with the reason; the session stays.
        let mut reasons = Vec::new();
        let told = eventually(40, || {
            let out = agent.ctl(&["token", "--min-valid", "61"]);
            reasons.push(stderr(&out));
            out.status.code() == Some(1) && stderr(&out).contains(expect)
        });
        assert!(told, "{mode}: {reasons:?}");
        assert!(
            reasons
                .iter()
                .all(|r| r.contains("could not be reached") || r.is_empty()),
            "{mode}: {reasons:?}"
        );
        assert_eq!(
            json(&agent.ctl(&["status", "--json"]))["state"],
            "signed_in",
            "{mode}"
        );
        post("/faults", "{\"endpoint\": \"token\", \"mode\": \"none\"}");
        // Once the provider is back (after the backoff), renewal works again.
        assert!(
            eventually(70, || agent
                .ctl(&["token", "--min-valid", "61"])
                .status
                .success()),
            "{mode}: recovered"
        );
    }
    // Grants revoked at the provider: the next refresh ends the session, and the client is told.
    post("/users/555021935107/revoke", "{}");
    let mut last = String::new();
    let ended = eventually(70, || {
        let out = agent.ctl(&["token", "--min-valid", "61"]);
        last = stderr(&out);
        last.contains("session has ended") || last.contains("Nobody is signed in")
    });
    assert!(ended, "revoked grants end the session: {last}");
    assert_eq!(
        json(&agent.ctl(&["status", "--json"]))["state"],
        "signed_out"
    );
}

#[test]
fn no_token_in_the_store_file_logs_or_a_core_dump() {
    let keyring = SecretService::start();
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), "keyring", 3600);
    // The control: in this environment a crashing process that is dumpable leaves a core file here.
    let control = dir.path().join("control");
    std::fs::create_dir_all(&control).unwrap();
    let _ = Command::new("sh")
        .args([
            "-c",
            "ulimit -c unlimited; sleep 5 & p=$!; sleep 0.2; kill -SEGV $p; wait $p",
        ])
        .current_dir(&control)
        .status();
    let cores_possible = std::fs::read_dir(&control).unwrap().count() > 0;

    let work = dir.path().join("cwd");
    std::fs::create_dir_all(&work).unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -c unlimited; exec {} --config {} --socket {}",
            bin("cis2-agentd").display(),
            s.config,
            socket.display()
        ))
        .current_dir(&work)
        .env("BROWSER", bin("cis2-scripted-browser"))
        .env("DBUS_SESSION_BUS_ADDRESS", &keyring.address)
        .env("CIS2_LOG", "trace")
        .stderr(log);
    let mut process = Process::start(command);
    process.wait_for("listening on ", Duration::from_secs(30));
    let ctl = |args: &[&str]| cis2_system_tests::ctl(&socket, args);
    assert!(ctl(&["login"]).status.success());
    let token = stdout(&ctl(&["token"])).trim().to_string();
    assert!(token.len() > 20);
    assert_eq!(ctl(&["whoami"]).status.code(), Some(0));
    // The agent crashes while holding the token: it is not dumpable, so no core file is written.
    let _ = Command::new("kill")
        .args(["-ABRT", &process.child.id().to_string()])
        .status();
    let _ = process.child.wait();
    let cores: Vec<_> = std::fs::read_dir(&work).unwrap().flatten().collect();
    if cores_possible {
        assert!(cores.is_empty(), "the agent left a core dump: {cores:?}");
    } else {
        eprintln!("this machine writes no core files at all; the dump check proves nothing here");
    }
    let mut checked = 0;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !contains_any(&bytes, std::slice::from_ref(&token)),
            "the token is in {}",
            entry.display()
        );
        if !entry.starts_with(&control) {
            assert!(
                !bytes.windows(4).any(|w| w == b"eyJh"),
                "a JWT is in {}",
                entry.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "the store file, audit log and agent log were searched ({checked} files)"
    );
    assert!(
        dir.path().join("data/session.bin").exists(),
        "the store file was among them"
    );
}

fn contains_any(haystack: &[u8], needles: &[String]) -> bool {
    needles
        .iter()
        .any(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
