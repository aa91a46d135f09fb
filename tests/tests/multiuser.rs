//! Terminal servers and shared PCs: two real OS users on one computer, created for each test and
//! removed after it (this needs root, as CI and the development machine have; without it each test
//! says so loudly and does nothing). A victim's clients never talk to a fake agent another user put
//! where the agent would be, and another user who reads the victim's browser command line cannot
//! complete the victim's sign-in.

use cis2_system_tests::{Process, bin, stderr, stdout};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// An OS user made for one test; `userdel` on drop.
struct OsUser {
    name: String,
    uid: u32,
    home: PathBuf,
}

impl OsUser {
    fn create(role: &str, base: &Path) -> OsUser {
        let name = format!("c2{role}{}", std::process::id() % 100_000);
        let home = base.join(&name);
        let made = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(&home)
            .arg(&name)
            .output()
            .expect("useradd runs");
        assert!(made.status.success(), "useradd: {}", stderr(&made));
        let uid: u32 = stdout(&Command::new("id").args(["-u", &name]).output().unwrap())
            .trim()
            .parse()
            .unwrap();
        std::fs::create_dir(&home).unwrap();
        chown(&home, uid);
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        OsUser { name, uid, home }
    }

    /// A command run as this user, with a clean environment of their own.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid",
                &self.uid.to_string(),
                "--regid",
                &self.uid.to_string(),
                "--clear-groups",
                "--",
            ])
            .arg(program)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .current_dir(&self.home);
        command
    }
}

impl Drop for OsUser {
    fn drop(&mut self) {
        // The test's processes of this user were stopped first (they are dropped before the user).
        let removed = Command::new("userdel").arg(&self.name).status();
        if !removed.is_ok_and(|s| s.success()) {
            eprintln!(
                "*** could not remove the test user {}: remove it by hand ***",
                self.name
            );
        }
    }
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

fn is_root() -> bool {
    let uid = Command::new("id").arg("-u").output().expect("id runs");
    if stdout(&uid).trim() == "0" {
        return true;
    }
    eprintln!(
        "\n*** SKIPPED: this multi-user test needs root (to create and remove two OS users); run the system tests as root, as CI does ***\n"
    );
    false
}

/// A world-readable folder both users can read (the binaries and shared scripts live there).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cis2-multiuser-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A stand-in for another user's fake agent: answers every line with a fake signed-in status, and
/// writes each line it was sent to `log`. `listen_as`: the uid to become before listening (the
/// socket is bound first, as root, so it can sit in a folder of the victim's).
const FAKE_AGENT: &str = r#"
import os, socket, sys
path, log, listen_as = sys.argv[1], sys.argv[2], int(sys.argv[3])
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
if os.geteuid() != listen_as:
    os.setgid(listen_as)
    os.setuid(listen_as)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    try:
        data = conn.recv(65536)
        with open(log, "ab") as f:
            f.write(data)
        conn.sendall(b'{"jsonrpc":"2.0","id":1,"result":{"environment":"production","state":"signed_in","user":{"uid":"666","name":"Mallory Injected"}}}\n')
    except OSError:
        pass  # the client hung up without a word, as a careful client does
    conn.close()
"#;

fn start_fake_agent(command: Command) -> Process {
    let mut fake = Process::start(command);
    fake.wait_for("ready", Duration::from_secs(20));
    fake
}

fn ctl_as(user: &OsUser, args: &[&str]) -> Output {
    user.command(bin("cis2ctl"))
        .args(args)
        .output()
        .expect("cis2ctl runs")
}

#[test]
fn a_client_never_talks_to_a_fake_agent_another_user_put_in_its_way() {
    if !is_root() {
        return;
    }
    let shared = shared_dir();
    let victim = OsUser::create("fv", shared.path());
    let mallory = OsUser::create("fm", shared.path());
    let script = shared.path().join("fake_agent.py");
    std::fs::write(&script, FAKE_AGENT).unwrap();
    let heard = shared.path().join("heard.log");
    std::fs::write(&heard, "").unwrap();
    chown(&heard, mallory.uid);

    // Mallory gets to /tmp/cis2-agent-<victim uid> first and listens there.
    let squatted = PathBuf::from(format!("/tmp/cis2-agent-{}", victim.uid));
    let _ = std::fs::remove_dir_all(&squatted);
    let made = mallory
        .command("mkdir")
        .args(["-m", "0777"])
        .arg(&squatted)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let fake_socket = squatted.join("agent.sock");
    let _fake = start_fake_agent({
        let mut c = mallory.command("/usr/bin/python3");
        c.arg(&script)
            .arg(&fake_socket)
            .arg(&heard)
            .arg(mallory.uid.to_string());
        c
    });

    // The default rule steps around the squatted folder: no agent there yet, and nothing sent.
    let out = ctl_as(&victim, &["status"]);
    let fallback = victim.home.join(".cache/cis2-agent/agent.sock");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&fallback.display().to_string()),
        "{}",
        stderr(&out)
    );
    // Named outright, the squatted socket is refused before anything is sent, naming folder and owner.
    let out = ctl_as(
        &victim,
        &["--socket", fake_socket.to_str().unwrap(), "token"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let why = stderr(&out);
    assert!(
        why.contains(&squatted.display().to_string())
            && why.contains(&format!("uid {} ({})", mallory.uid, mallory.name)),
        "{why}"
    );
    assert!(!stdout(&out).contains("Mallory"), "{}", stdout(&out));
    // The documented Python example refuses it the same way.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/cis2_client.py");
    let out = victim
        .command("/usr/bin/python3")
        .arg(&example)
        .arg(&fake_socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("belongs to uid {}", mallory.uid)),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&heard).unwrap(),
        "",
        "the fake agent heard nothing"
    );

    // The victim's agent falls back to their home, says so, and its clients find it by the same rule.
    let mut agent = Process::start({
        let mut c = victim.command(bin("cis2-agentd"));
        c.arg("--sandbox")
            .env("XDG_DATA_HOME", victim.home.join("data"))
            .env("XDG_CONFIG_HOME", victim.home.join("no-config"));
        c
    });
    let listening = agent.wait_for("listening on ", Duration::from_secs(30));
    assert_eq!(Path::new(&listening), fallback);
    let out = ctl_as(&victim, &["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("\"sandbox\""), "{}", stdout(&out));
    let out = victim
        .command("/usr/bin/python3")
        .args(["-c", "import sys; sys.path.insert(0, sys.argv[1]); import cis2_client as c; print(c.default_socket_path())"])
        .arg(example.parent().unwrap())
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out).trim(),
        fallback.display().to_string(),
        "{}",
        stderr(&out)
    );

    // A folder of the victim's own, 0700, but another user's program listening: SO_PEERCRED tells.
    let own = victim.home.join("own");
    std::fs::create_dir(&own).unwrap();
    chown(&own, victim.uid);
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    let planted = own.join("agent.sock");
    let _planted = start_fake_agent({
        let mut c = Command::new("/usr/bin/python3");
        c.arg(&script)
            .arg(&planted)
            .arg(&heard)
            .arg(mallory.uid.to_string());
        c
    });
    let out = ctl_as(&victim, &["--socket", planted.to_str().unwrap(), "status"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("runs as uid {} ({})", mallory.uid, mallory.name)),
        "{}",
        stderr(&out)
    );
    let out = victim
        .command("/usr/bin/python3")
        .arg(&example)
        .arg(&planted)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("not your agent"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&heard).unwrap(),
        "",
        "still nothing sent"
    );

    agent.kill();
    let _ = std::fs::remove_dir_all(&squatted);
}

/// `$BROWSER` for the victim: shows the command line it was given (as every browser does, in
/// /proc/PID/cmdline), says its pid, and waits for the test's word before it goes on.
const HELD_BROWSER: &str = r#"#!/bin/sh
echo $$ > "$CIS2_TEST_SHARED/browser.pid"
while [ ! -e "$CIS2_TEST_SHARED/go" ]; do sleep 0.05; done
exec "$CIS2_TEST_SCRIPTED_BROWSER" "$@"
"#;

#[test]
fn another_user_who_reads_the_browser_command_line_cannot_take_over_the_sign_in() {
    if !is_root() {
        return;
    }
    let shared = shared_dir();
    let victim = OsUser::create("sv", shared.path());
    let mallory = OsUser::create("sm", shared.path());
    let pass = shared.path().join("pass");
    std::fs::create_dir(&pass).unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o777)).unwrap();
    let browser = shared.path().join("held-browser.sh");
    std::fs::write(&browser, HELD_BROWSER).unwrap();
    std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = victim.home.join("run/agent.sock");

    let mut agent = Process::start({
        let mut c = victim.command(bin("cis2-agentd"));
        c.arg("--sandbox")
            .arg("--socket")
            .arg(&socket)
            .env("BROWSER", &browser)
            .env("CIS2_TEST_SHARED", &pass)
            .env("CIS2_TEST_SCRIPTED_BROWSER", bin("cis2-scripted-browser"))
            .env("CIS2_TEST_USER", "555021935107")
            .env("XDG_DATA_HOME", victim.home.join("data"))
            .env("XDG_CONFIG_HOME", victim.home.join("no-config"));
        c
    });
    agent.wait_for("listening on ", Duration::from_secs(30));
    let login = victim
        .command(bin("cis2ctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["login", "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Mallory reads the victim's browser command line, as any user can, and runs the sign-in it
    // names as a person of her choosing.
    let pid_file = pass.join("browser.pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !pid_file.exists()
        || std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the browser was never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let cmdline = mallory
        .command("cat")
        .arg(format!("/proc/{pid}/cmdline"))
        .output()
        .unwrap();
    assert!(
        cmdline.status.success(),
        "Mallory can read it: {}",
        stderr(&cmdline)
    );
    let seen = String::from_utf8_lossy(&cmdline.stdout).to_string();
    let opened = seen
        .split('\0')
        .rfind(|a| !a.is_empty())
        .unwrap()
        .to_string();
    for secret in ["state=", "nonce=", "code_challenge=", "/start/"] {
        assert!(
            !opened.contains(secret),
            "{secret} is in the command line: {opened}"
        );
    }
    let attack = mallory
        .command(bin("cis2-scripted-browser"))
        .arg(&opened)
        .env("CIS2_TEST_USER", "555021935108")
        .output()
        .unwrap();
    assert!(
        !attack.status.success(),
        "Mallory's browser got through: {}",
        stderr(&attack)
    );

    // The victim's own browser goes on and signs in the victim's person.
    std::fs::write(pass.join("go"), "").unwrap();
    let login = login.wait_with_output().unwrap();
    assert_eq!(
        login.status.code(),
        Some(0),
        "{}{}",
        stdout(&login),
        stderr(&login)
    );
    let out = ctl_as(
        &victim,
        &["--socket", socket.to_str().unwrap(), "whoami", "--json"],
    );
    let whoami: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(whoami["uid"], "555021935107", "{whoami}");
    // The agent says who signed in, so a swap could not go unseen.
    let announced = agent.wait_for("signed in: ", Duration::from_secs(10));
    assert!(announced.contains("(555021935107)"), "{announced}");
    agent.kill();
}
