//! The integration examples in docs/ run against a real agent, so they cannot rot.

use cis2_system_tests::{Agent, Process, compile_csharp, stderr, stdout};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn the_python_example_signs_in_and_gets_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/cis2_client.py");
    let output = Command::new("/usr/bin/python3")
        .arg(&example)
        .arg(&agent.socket)
        .output()
        .expect("python3 runs");
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(&output));
    assert!(text.contains("SANDBOX"), "{text}");
    assert!(text.contains("user: Amelia Hart (555021935107)"), "{text}");
    assert!(text.contains("access token:"), "{text}");
    assert!(text.contains("event: signed_in"), "{text}");
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert!(
        token.len() > 20 && !text.contains(&token),
        "the example never prints the token"
    );
}

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The C# example as an EHR vendor would build it for .NET Framework: C# 7, base class library only,
/// compiled by Debian's Mono compiler (mono-mcs; scripts/install-deps) with warnings as errors.
fn compile_csharp_example(dir: &Path) -> std::path::PathBuf {
    let exe = dir.join("Cis2Client.exe");
    compile_csharp(
        &repo_root().join("docs/examples/Cis2Client.cs"),
        &exe,
        &["-langversion:7", "-warnaserror"],
    );
    exe
}

/// Runs the example with `--watch` under mono (mono-runtime) and waits until it has signed in, got a
/// token, printed the events that came meanwhile and started watching. Returns it and the token's length
/// as it printed it.
fn csharp_example_signed_in(exe: &Path, agent: &Agent) -> (Process, usize) {
    let mut command = Command::new("mono");
    command.arg(exe).arg(&agent.socket).arg("--watch");
    let mut client = Process::start(command);
    let wait = Duration::from_secs(60);
    client.wait_for("SANDBOX: not NHS CIS2", wait);
    assert_eq!(
        client.wait_for("environment: ", wait),
        "sandbox, state: signed_out"
    );
    assert_eq!(client.wait_for("after login: ", wait), "signed_in");
    assert_eq!(
        client.wait_for("user: ", wait),
        "Amelia Hart (555021935107)"
    );
    let role = client.wait_for("selected role: ", wait);
    assert!(role.contains(" at "), "{role}");
    let token = client.wait_for("access token: ", wait);
    let (length, rest) = token.split_once(" characters, ").expect("N characters, …");
    assert!(rest.starts_with("Bearer, expires 20"), "{token}");
    let length: usize = length.parse().expect("a length");
    // The signed_in event came before login's answer; the example prints it after the token.
    client.wait_for("event: signed_in", wait);
    client.wait_for("watching events", wait);
    (client, length)
}

fn signal(agent: &mut Agent, name: &str) {
    let _ = Command::new("kill")
        .args([name, &agent.process.child.id().to_string()])
        .status();
    let _ = agent.process.child.wait();
}

fn exits(client: &mut Process) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(status) = client.child.try_wait().unwrap() {
            // A signal has no exit code: say which, so a failure shows how mono ended.
            if status.code().is_none() {
                eprintln!("the C# example ended without an exit code: {status:?}");
            }
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn the_csharp_example_compiles_with_mono_signs_in_and_follows_the_agent_stopping_and_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile_csharp_example(dir.path());

    // The agent stops (SIGTERM): `agent_stopping`, and the sandbox's session does not survive.
    let mut agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let (mut client, length) = csharp_example_signed_in(&exe, &agent);
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert_eq!(token.len(), length, "the example reports the token it got");
    assert!(
        !client.seen.iter().any(|line| line.contains(&token)),
        "the example never prints the token"
    );
    signal(&mut agent, "-TERM");
    assert_eq!(
        client.wait_for("event: agent_stopping", Duration::from_secs(30)),
        "(session_survives: false)"
    );
    client.wait_for(
        "the session is gone: act as for signed_out",
        Duration::from_secs(30),
    );
    assert_eq!(exits(&mut client), Some(0), "{:?}", client.seen);

    // The agent is killed (no event) and started again: the example reconnects, and its status shows
    // that the session it showed is gone.
    let mut agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let (mut client, _) = csharp_example_signed_in(&exe, &agent);
    signal(&mut agent, "-9");
    client.wait_for(
        "connection closed: the session is unknown; reconnecting",
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(1500)); // at least one refused reconnection
    let _agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    assert_eq!(
        client.wait_for("after reconnecting: ", Duration::from_secs(60)),
        "signed_out, not the session shown: act as for signed_out"
    );
    assert_eq!(exits(&mut client), Some(0), "{:?}", client.seen);
    assert!(
        !client
            .seen
            .iter()
            .any(|l| l.starts_with("event: agent_stopping")),
        "kill -9 sends no event: {:?}",
        client.seen
    );
}

/// docs/ipc.md shows the C# example in full: it must be the file the test above compiles and runs.
#[test]
fn the_csharp_example_in_the_ipc_docs_is_the_tested_file() {
    let docs = std::fs::read_to_string(repo_root().join("docs/ipc.md")).unwrap();
    let file = std::fs::read_to_string(repo_root().join("docs/examples/Cis2Client.cs")).unwrap();
    let blocks: Vec<&str> = docs
        .split("\n```csharp\n")
        .skip(1)
        .map(|rest| rest.split("\n```\n").next().unwrap_or(rest))
        .collect();
    assert_eq!(blocks.len(), 1, "one C# block in docs/ipc.md");
    let shown = blocks[0];
    if let Some((n, (a, b))) = shown
        .lines()
        .zip(file.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        panic!(
            "docs/ipc.md's C# block differs from docs/examples/Cis2Client.cs at line {}:\n  docs: {a}\n  file: {b}",
            n + 1
        );
    }
    assert_eq!(
        shown.lines().count(),
        file.lines().count(),
        "docs/ipc.md's C# block and docs/examples/Cis2Client.cs differ in length"
    );
}
