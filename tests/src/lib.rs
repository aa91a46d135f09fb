//! Helpers for the whole-system tests in `tests/tests/`: the workspace's programs started as
//! processes (built beforehand with `cargo build --workspace --bins`), read through their stdout, and
//! stopped when the test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A program of this workspace, from the same target folder as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the system tests",
        path.display()
    );
    path
}

/// A started program whose stdout lines can be waited for; killed on drop.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Process {
    pub fn start(mut command: Command) -> Process {
        command.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = command.spawn().expect("the program starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!(
                    "no line starting with {prefix:?} within {timeout:?}; saw {:?}; exit status {:?}",
                    self.seen,
                    self.child.try_wait()
                ),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cis2-agentd` on its own socket in `dir`, with the scripted browser as `$BROWSER`.
pub struct Agent {
    pub process: Process,
    pub socket: PathBuf,
    pub browser_log: PathBuf,
}

impl Agent {
    /// `args`: extra flags (`--sandbox`, `--config FILE`…); `env`: extra environment.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_inner(dir, args, env, None)
    }

    /// [`Agent::start`] with the agent's stderr (its log) written to the file `log`.
    pub fn start_logged(dir: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Agent {
        let file = std::fs::File::create(log).expect("the log file can be created");
        Agent::start_inner(dir, args, env, Some(Stdio::from(file)))
    }

    fn start_inner(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Option<Stdio>,
    ) -> Agent {
        let socket = dir.join("run").join("agent.sock");
        let browser_log = dir.join("browser.log");
        let mut command = Command::new(bin("cis2-agentd"));
        command
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env("BROWSER", bin("cis2-scripted-browser"))
            .env("CIS2_TEST_BROWSER_LOG", &browser_log)
            .env_remove("CIS2_AGENT_CONFIG")
            .env("XDG_CONFIG_HOME", dir.join("no-config"))
            .env("XDG_DATA_HOME", dir.join("data"));
        for (k, v) in env {
            command.env(k, v);
        }
        if let Some(stderr) = stderr {
            command.stderr(stderr);
        }
        let mut process = Process::start(command);
        let listening = process.wait_for("listening on ", Duration::from_secs(30));
        assert_eq!(Path::new(&listening), socket);
        Agent {
            process,
            socket,
            browser_log,
        }
    }

    /// Runs `cis2ctl --socket SOCKET args…`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.socket, args)
    }

    /// How many times the agent opened the browser.
    pub fn browser_opened(&self) -> usize {
        std::fs::read_to_string(&self.browser_log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("cis2ctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("cis2ctl runs")
}

/// Compiles a C# source with Debian's Mono compiler (mono-mcs; scripts/install-deps) into `exe`, with
/// `options` before it, and fails the test with the compiler's words if it does not compile.
pub fn compile_csharp(source: &Path, exe: &Path, options: &[&str]) {
    let compiled = Command::new("mcs")
        .args(options)
        .arg(format!("-out:{}", exe.display()))
        .arg(source)
        .output()
        .expect("mcs (Debian mono-mcs; scripts/install-deps) runs");
    assert!(
        compiled.status.success(),
        "mcs: {}{}",
        stdout(&compiled),
        stderr(&compiled)
    );
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} / {}", stdout(output), stderr(output)))
}

/// A private D-Bus session bus with an unlocked GNOME Keyring on it: the real Secret Service, as CI
/// has it (packages `dbus-daemon`, `gnome-keyring`). Stopped on drop.
pub struct SecretService {
    keyring: Child,
    /// Kept for its Drop: the bus stops after the keyring.
    _bus: PrivateBus,
    pub address: String,
    _home: tempfile::TempDir,
}

/// A private D-Bus daemon of the tests' own (Debian package dbus-daemon); stopped on drop.
pub struct PrivateBus {
    daemon: Child,
    pub address: String,
}

impl PrivateBus {
    pub fn start() -> PrivateBus {
        let mut daemon = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon) starts");
        let mut address = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        PrivateBus {
            daemon,
            address: address.trim().to_string(),
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// A private system bus with the stand-in logind (tests/standins/logind.py), which emits the session's
/// Lock and Unlock signals when asked: an agent given `DBUS_SYSTEM_BUS_ADDRESS = bus.address` hears
/// them through the code that listens to the real logind. Stopped on drop.
pub struct StandinLogind {
    _logind: Process,
    pub bus: PrivateBus,
}

impl StandinLogind {
    pub fn start() -> StandinLogind {
        let bus = PrivateBus::start();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("standins/logind.py");
        let mut command = Command::new("/usr/bin/python3");
        command.arg(script).arg(&bus.address);
        let mut logind = Process::start(command);
        logind.wait_for("ready", Duration::from_secs(20));
        StandinLogind {
            _logind: logind,
            bus,
        }
    }

    /// The `dbus-send` command (program and arguments) that makes it emit `member` (`EmitLock`,
    /// `EmitUnlock`), for a test program to run at the moment it chooses.
    pub fn emit_command(&self, member: &str) -> Vec<String> {
        vec![
            "dbus-send".into(),
            format!("--bus={}", self.bus.address),
            "--print-reply".into(),
            "--dest=org.freedesktop.login1".into(),
            "/org/freedesktop/login1/session/_31".into(),
            format!("test.Control.{member}"),
        ]
    }

    pub fn emit(&self, member: &str) {
        let command = self.emit_command(member);
        let out = Command::new(&command[0])
            .args(&command[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

impl SecretService {
    pub fn start() -> SecretService {
        let home = tempfile::tempdir().unwrap();
        let bus = PrivateBus::start();
        let address = bus.address.clone();
        let runtime = home.path().join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        // Only Unix has a Secret Service; this lets the workspace build for Windows.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let mut keyring = Command::new("gnome-keyring-daemon")
            .args(["--foreground", "--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnome-keyring-daemon (Debian package gnome-keyring) starts");
        {
            use std::io::Write;
            let mut stdin = keyring.stdin.take().unwrap();
            stdin.write_all(b"test-password").unwrap();
        }
        // Ready when the Secret Service name is owned on the bus.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let owned = Command::new("dbus-send")
                .args([
                    "--session",
                    "--print-reply",
                    "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.NameHasOwner",
                    "string:org.freedesktop.secrets",
                ])
                .env("DBUS_SESSION_BUS_ADDRESS", &address)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
                .unwrap_or(false);
            if owned {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the Secret Service did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        SecretService {
            _bus: bus,
            keyring,
            address,
            _home: home,
        }
    }
}

impl Drop for SecretService {
    fn drop(&mut self) {
        // The keyring goes first; the bus, a field, is stopped when the fields drop after this.
        let _ = self.keyring.kill();
        let _ = self.keyring.wait();
    }
}

/// oidc-agent (Debian `oidc-agent-cli`) with an account at `issuer`, set up by
/// bench/oidc-agent-setup.sh, for side-by-side benchmarks. `None` where oidc-agent is not installed.
/// Stopped (its process group and the setup's token-auth shim) on drop.
pub struct OidcAgent {
    pub env: Vec<(String, String)>,
    pub socket: PathBuf,
    pub account: String,
}

impl OidcAgent {
    pub fn start(issuer: &str, work: &Path) -> Option<OidcAgent> {
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/oidc-agent-setup.sh");
        if !setup.exists()
            || Command::new("oidc-agent")
                .arg("--version")
                .output()
                .is_err()
        {
            return None;
        }
        std::fs::create_dir_all(work).unwrap();
        let out = Command::new("bash")
            .arg(&setup)
            .arg(issuer)
            .arg(work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "oidc-agent setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'', ';']).to_string()))
            .collect();
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Some(OidcAgent {
            socket: PathBuf::from(get("OIDC_SOCK").expect("OIDC_SOCK")),
            account: get("OIDC_BENCH_ACCOUNT").unwrap_or_else(|| "cis2bench".into()),
            env,
        })
    }
}

impl Drop for OidcAgent {
    fn drop(&mut self) {
        for (name, arg) in [
            ("OIDC_BENCH_AGENT_PGID", true),
            ("OIDC_BENCH_SHIM_PID", false),
        ] {
            if let Some((_, id)) = self.env.iter().find(|(k, _)| k == name) {
                let target = if arg { format!("-{id}") } else { id.clone() };
                let _ = Command::new("kill").arg("--").arg(target).status();
            }
        }
    }
}

/// For each needle, whether it occurs anywhere in the readable memory of process `pid` (its heap,
/// stacks and mappings, from /proc/PID/maps and /proc/PID/mem). Reading another process's memory needs
/// root (CAP_SYS_PTRACE) here because the agent makes itself non-dumpable; `None` when it cannot.
pub fn memory_contains(pid: u32, needles: &[&[u8]]) -> Option<Vec<bool>> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut found = vec![false; needles.len()];
    let mut read_any = false;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r') || path == "[vvar]" || path == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        read_any = true;
        for (i, needle) in needles.iter().enumerate() {
            if !found[i] && region.windows(needle.len()).any(|w| w == *needle) {
                found[i] = true;
            }
        }
    }
    read_any.then_some(found)
}
