//! Hand-over on a shared workstation: clinician A signs out and B signs in while 50 clients hammer the
//! agent. On every connection, A's `signed_out` comes before B's `signed_in`, and nothing of A — token or
//! identity — arrives after A's `signed_out`.

use cis2_system_tests::{Agent, bin, ctl, stderr, stdout};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const A: &str = "555021935107";
const B: &str = "555021935108";

/// Signs in `uid` through the address the agent prints with --no-browser.
fn sign_in(agent: &mut Agent, uid: &str) {
    let socket = agent.socket.clone();
    let login = std::thread::spawn(move || ctl(&socket, &["login", "--timeout", "60"]));
    let url = agent.process.wait_for(
        "To sign in, open this address in a browser: ",
        Duration::from_secs(30),
    );
    let browser = Command::new(bin("cis2-scripted-browser"))
        .arg(&url)
        .env("CIS2_TEST_USER", uid)
        .output()
        .unwrap();
    assert!(browser.status.success(), "{}", stderr(&browser));
    let login = login.join().unwrap();
    assert!(login.status.success(), "{}", stderr(&login));
}

/// One client: subscribes, then alternates token and whoami until told to stop; every line it
/// receives is kept in arrival order.
fn hammer(socket: std::path::PathBuf, stop: Arc<AtomicBool>) -> Vec<Value> {
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut seen = Vec::new();
    let mut id = 0u64;
    let mut send = |stream: &mut UnixStream, method: &str| {
        id += 1;
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {}});
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        id
    };
    let read_until = |reader: &mut BufReader<UnixStream>, id: u64, seen: &mut Vec<Value>| loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        let done = value["id"].as_u64() == Some(id);
        seen.push(value);
        if done {
            return;
        }
    };
    let sub = send(&mut stream, "subscribe");
    read_until(&mut reader, sub, &mut seen);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let method = if n % 2 == 0 { "token" } else { "whoami" };
        let id = send(&mut stream, method);
        read_until(&mut reader, id, &mut seen);
        n += 1;
    }
    seen
}

#[test]
fn no_client_gets_anything_of_a_after_a_signed_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "environment = \"sandbox\"\n[session]\ninactivity_action = \"none\"\n",
    )
    .unwrap();
    // Each token answer is held 20 ms after it is read, so sign-out overtakes answers in flight.
    let mut agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--no-browser"],
        &[("CIS2_TEST_PAUSE_TOKEN_MS", "20")],
    );
    sign_in(&mut agent, A);
    let token_a = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert!(token_a.len() > 20);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (socket, stop) = (agent.socket.clone(), stop.clone());
            std::thread::spawn(move || hammer(socket, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // B may not take over while A is signed in…
    let refused = {
        let socket = agent.socket.clone();
        let attempt = std::thread::spawn(move || ctl(&socket, &["login", "--timeout", "60"]));
        std::thread::sleep(Duration::from_millis(100));
        attempt
    };
    let refused = refused.join().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("sign out first"),
        "login while A is signed in is refused: {}",
        stderr(&refused)
    );
    // …so A signs out, and B signs in, all under load.
    assert!(agent.ctl(&["logout"]).status.success());
    sign_in(&mut agent, B);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);

    let mut total_answers = 0;
    for client in clients {
        let seen = client.join().unwrap();
        let signed_out = seen
            .iter()
            .position(|v| v["params"]["type"] == "signed_out")
            .expect("every client is told A signed out");
        let signed_in_b = seen
            .iter()
            .position(|v| v["params"]["type"] == "signed_in" && v["params"]["user"]["uid"] == B)
            .expect("every client is told B signed in");
        assert!(
            signed_out < signed_in_b,
            "signed_out for A comes before signed_in for B"
        );
        for answer in &seen[signed_out..] {
            let result = &answer["result"];
            assert_ne!(
                result["access_token"].as_str(),
                Some(token_a.as_str()),
                "A's token after A's signed_out"
            );
            assert_ne!(
                result["uid"].as_str(),
                Some(A),
                "A's identity after A's signed_out"
            );
        }
        let b_answers = seen[signed_in_b..]
            .iter()
            .filter(|v| v["result"]["uid"] == B || v["result"]["access_token"].is_string())
            .count();
        assert!(b_answers > 0, "B is served once signed in");
        total_answers += seen.iter().filter(|v| v.get("id").is_some()).count();
    }
    eprintln!("{total_answers} answers checked across 50 clients");
}

#[test]
fn with_allow_user_switch_b_signing_in_hands_over_from_a() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "environment = \"sandbox\"\n[workstation]\nallow_user_switch = true\n",
    )
    .unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--no-browser"],
        &[],
    );
    sign_in(&mut agent, A);
    let mut watcher = {
        let mut command = Command::new(bin("cis2ctl"));
        command.arg("--socket").arg(&agent.socket).arg("watch");
        cis2_system_tests::Process::start(command)
    };
    std::thread::sleep(Duration::from_millis(200));
    sign_in(&mut agent, B);
    watcher.wait_for(
        "{\"reason\":\"another clinician signed in\",\"type\":\"signed_out\"}",
        Duration::from_secs(5),
    );
    let signed_in = watcher.wait_for("{", Duration::from_secs(5));
    let event: Value = serde_json::from_str(&format!("{{{signed_in}")).unwrap();
    assert_eq!(event["type"], "signed_in");
    assert_eq!(event["user"]["uid"], B);
    let whoami: Value = serde_json::from_str(&stdout(&agent.ctl(&["whoami", "--json"]))).unwrap();
    assert_eq!(whoami["uid"], B);
}

#[test]
fn with_store_memory_nothing_of_a_remains_in_the_agent_or_on_disk_after_sign_out() {
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        "[[clients]]\nclient_id = \"ward.apps.national\"\nauth_method = \"none\"\n\
         redirect_uris = [\"http://127.0.0.1/callback\"]\nrefresh_tokens = true\nrotate_refresh_tokens = true\n",
    )
    .unwrap();
    // The provider in its own process: its memory rightly holds what it issued.
    let mut idp = cis2_system_tests::Process::start({
        let mut command = Command::new(bin("cis2-mock-idp"));
        command.args(["--port", "0", "--clients"]).arg(&clients);
        command
    });
    let issuer = format!(
        "http://{}",
        idp.wait_for("http://", Duration::from_secs(30))
    );
    let data = dir.path().join("data");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"ward.apps.national\"\n\
             [provider.exchange]\nmethod = \"none\"\n[agent]\nstore = \"memory\"\nclient_policy = \"allow\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("CIS2_TEST_USER", A)],
    );
    assert!(agent.ctl(&["login"]).status.success());
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    let whoami: Value = serde_json::from_str(&stdout(&agent.ctl(&["whoami", "--json"]))).unwrap();
    let name = whoami["name"].as_str().unwrap().to_string();
    let pid = agent.process.child.id();
    let needles: [&[u8]; 2] = [token.as_bytes(), name.as_bytes()];

    let Some(before) = cis2_system_tests::memory_contains(pid, &needles) else {
        eprintln!(
            "SKIPPED: this user cannot read the agent's memory (needs root / CAP_SYS_PTRACE)"
        );
        return;
    };
    assert_eq!(
        before,
        vec![true, true],
        "the scan finds A while A is signed in"
    );

    assert!(agent.ctl(&["logout"]).status.success());
    // The provider-side end of the session runs in the background; let it finish.
    std::thread::sleep(Duration::from_millis(500));
    let after = cis2_system_tests::memory_contains(pid, &needles).unwrap();
    assert_eq!(
        after,
        vec![false, false],
        "A's access token and name are gone from the agent's memory"
    );
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "{} holds A's token",
                path.display()
            );
        }
    }
    drop(idp.child.kill());
}
