//! The C library from the languages EHRs are written in, against sandbox agents as processes:
//! a C program built with gcc (tests/c/c_client_test.c, one scenario per agent set-up), Python's
//! ctypes (docs/examples/cis2_client_ctypes.py) and C# P/Invoke compiled with Debian's mcs and run by
//! mono (docs/examples/Cis2Native.cs). Needs the workspace's programs built first (scripts/build), as
//! every system test does.

use cis2_system_tests::{Agent, StandinLogind, bin, compile_csharp, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where cargo put libcis2_client.so: beside this test in deps/, built with it (a `cargo build` of the
/// crate also copies it up to the programs' folder, which may hold an older one).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    assert!(
        deps.join("libcis2_client.so").exists(),
        "libcis2_client.so is missing beside {}",
        exe.display()
    );
    deps.to_path_buf()
}

/// The C test program, built once per test run: an EHR of its own, in a folder of its own.
fn c_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let program = dir.join("ward-ehr");
        let lib = lib_dir();
        let out = Command::new("gcc")
            .args([
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-O1",
                "-pthread",
                "-I",
            ])
            .arg(crate_dir())
            .arg("-o")
            .arg(&program)
            .arg(crate_dir().join("tests/c/c_client_test.c"))
            .arg("-L")
            .arg(&lib)
            .arg("-lcis2_client")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .output()
            .expect("gcc (Debian build-essential) runs");
        assert!(out.status.success(), "gcc: {}", stderr(&out));
        program
    })
}

/// Runs one scenario of the C program and fails the test with its report unless every check passed.
fn run_c(scenario: &str, endpoint: &Path, env: &[(&str, String)]) -> Output {
    let mut command = Command::new(c_program());
    command.arg(scenario).arg(endpoint);
    command.env_remove("CIS2_AGENT_SOCK");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    let report = stdout(&out);
    assert!(
        out.status.success() && !report.contains("FAIL - ") && !report.contains("skip - "),
        "the C program's {scenario} scenario failed:\n{report}\n{}",
        stderr(&out)
    );
    assert!(
        report.contains(&format!("c-client {scenario}: ")),
        "{report}"
    );
    out
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn ctl_command(agent: &Agent, args: &str) -> String {
    format!(
        "{} --socket {} {args} >/dev/null",
        shell_quote(bin("cis2ctl").to_str().unwrap()),
        shell_quote(agent.socket.to_str().unwrap())
    )
}

/// A sandbox agent whose config is `environment = "sandbox"`, `[agent] data_dir` and `agent_keys`
/// (more `[agent]` keys), then `tables`; returns it and its data folder.
fn sandbox_with(
    dir: &Path,
    agent_keys: &str,
    tables: &str,
    env: &[(&str, &str)],
) -> (Agent, PathBuf) {
    let data = dir.join("data");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"sandbox\"\n[agent]\ndata_dir = \"{}\"\n{agent_keys}\n{tables}\n",
            data.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(dir, &["--config", config.to_str().unwrap()], env);
    (agent, data)
}

#[test]
fn c_with_no_agent_open_fails_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    run_c("no-agent", &dir.path().join("none/agent.sock"), &[]);
}

#[test]
fn c_signed_out_every_call_answers_not_signed_in_and_buffers_report_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let socket = agent.socket.to_str().unwrap().to_string();
    run_c("signed-out", &agent.socket, &[("CIS2_AGENT_SOCK", socket)]);
    assert_eq!(
        agent.browser_opened(),
        0,
        "get_token_no_auth never starts a sign-in"
    );
}

#[test]
fn c_a_cancelled_sign_in_is_sign_in_failed() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[("CIS2_TEST_CANCEL", "1")]);
    run_c("sign-in-failed", &agent.socket, &[]);
    assert_eq!(agent.browser_opened(), 1);
}

#[test]
fn c_signs_in_gets_tokens_from_many_threads_and_receives_events_until_the_agent_stops() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    // Stopped means gone: the program's next call must find no agent, so the command returns once the
    // agent has removed its socket (it answers on an open listener until then).
    let stop = format!(
        "kill -TERM {} && timeout 10 sh -c 'while [ -e \"$0\" ]; do sleep 0.05; done' {}",
        agent.process.child.id(),
        shell_quote(agent.socket.to_str().unwrap())
    );
    let out = run_c(
        "full",
        &agent.socket,
        &[
            ("CIS2_TEST_LOGOUT_CMD", ctl_command(&agent, "logout")),
            ("CIS2_TEST_STOP_AGENT_CMD", stop),
        ],
    );
    assert_eq!(agent.browser_opened(), 1, "one sign-in for every call");
    assert!(
        !stdout(&out).contains("eyJ") && stdout(&out).contains("# token: "),
        "the program reports the token's length, never the token"
    );
}

#[test]
fn c_a_locked_session_is_locked_until_get_token_signs_the_clinician_in_again() {
    let logind = StandinLogind::start();
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = sandbox_with(
        dir.path(),
        "",
        "[workstation]\non_os_lock = \"lock\"",
        &[("DBUS_SYSTEM_BUS_ADDRESS", logind.bus.address.as_str())],
    );
    let lock = logind
        .emit_command("EmitLock")
        .iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ");
    run_c(
        "locked",
        &agent.socket,
        &[("CIS2_TEST_LOCK_CMD", format!("{lock} >/dev/null"))],
    );
    assert_eq!(agent.browser_opened(), 2, "the sign-in, then the unlock");
}

#[test]
fn c_the_policy_sees_the_ehrs_own_executable() {
    let program = c_program().to_str().unwrap().to_string();
    // Refused: the agent serves only listed programs, and this one is not listed.
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = sandbox_with(dir.path(), "client_policy = \"deny\"", "", &[]);
    run_c(
        "denied",
        &agent.socket,
        &[("CIS2_TEST_SELF", program.clone())],
    );
    assert_eq!(
        agent.browser_opened(),
        0,
        "a refused program starts no sign-in"
    );

    // Allowed by its path: the audit log records the program itself, not a helper.
    let dir = tempfile::tempdir().unwrap();
    let (agent, data) = sandbox_with(
        dir.path(),
        "client_policy = \"deny\"",
        &format!("[[clients]]\nname = \"Ward EHR\"\npath = \"{program}\""),
        &[],
    );
    run_c("allowed", &agent.socket, &[]);
    // The program's last requests may still be in the agent's group commit when it exits.
    let token_ok = |records: &[serde_json::Value]| {
        records
            .iter()
            .any(|r| r["method"] == "token" && r["outcome"] == "ok")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (audit, records) = loop {
        let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap_or_default();
        let records: Vec<serde_json::Value> = audit
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if token_ok(&records) || std::time::Instant::now() > deadline {
            break (audit, records);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(token_ok(&records), "{audit}");
    assert!(
        records
            .iter()
            .all(|r| r["client"]["path"] == program.as_str()),
        "every request is the C program's own: {audit}"
    );
}

#[test]
fn python_ctypes_signs_in_and_hears_the_sign_out() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let sample = crate_dir().join("../../docs/examples/cis2_client_ctypes.py");
    let out = Command::new("/usr/bin/python3")
        .arg(&sample)
        .arg(&agent.socket)
        .env("CIS2_CLIENT_LIBRARY", lib_dir().join("libcis2_client.so"))
        .env("CIS2_TEST_LOGOUT_CMD", ctl_command(&agent, "logout"))
        .output()
        .expect("python3 runs");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for line in [
        "state: signed_out (sandbox: NOT NHS CIS2)",
        "user: Amelia Hart (555021935107)",
        "role: Clinical Practitioner Access Role at RX1",
        "token: ",
        "buffer too small: 7, needs ",
        "event: signed_in",
        "event: signed_out",
        "after sign-out: 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn csharp_pinvoke_under_mono_signs_in_and_hears_the_sign_out() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("Cis2Native.exe");
    compile_csharp(
        &crate_dir().join("../../docs/examples/Cis2Native.cs"),
        &exe,
        &[],
    );
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let out = Command::new("mono")
        .arg(&exe)
        .arg(&agent.socket)
        .env("LD_LIBRARY_PATH", lib_dir())
        .env("CIS2_TEST_LOGOUT_CMD", ctl_command(&agent, "logout"))
        .output()
        .expect("mono (Debian mono-runtime; scripts/install-deps) runs");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for line in [
        "state: signed_out (sandbox: NOT NHS CIS2)",
        "user: 555021935107",
        "token: ",
        "wide whoami matches",
        "event: signed_in",
        "event: signed_out",
        "after sign-out: NotSignedIn",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
