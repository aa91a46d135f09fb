//! The real window, end to end: the app built as it ships, run under Xvfb and driven through
//! `tauri-driver` and WebKitWebDriver (Debian `xvfb webkit2gtk-driver`, `cargo install tauri-driver
//! --locked`), with `cis2-scripted-browser` as `$BROWSER` completing the sandbox sign-in. Screenshots of
//! each screen go to `ci-artifacts/screenshots/` (kept by CI).
//!
//! On every screen it checks that the main actions are inside the window at its default size
//! (460×720), on top, with nothing scrolled. It also prints two figures (not asserted): start-up time
//! to a drawn window, and the resident memory of the app signed in and idle with its window open,
//! WebKit's processes included (`scripts/bench-idle` measures the window closed and reopened).

use base64::Engine;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One window at a time: two WebKit instances and two debug apps at once are more than a 2-core
/// machine answers within the test's time limits.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // SIGTERM first, so Xvfb removes its lock file and socket; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn target_bin(name: &str) -> PathBuf {
    // tests run from target/<profile>/deps; the workspace's programs sit one folder up.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

fn find_program(name: &str, hint: &str) -> PathBuf {
    let home_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin").join(name));
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain(home_bin)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is needed for the window test: {hint}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An X server and a session bus of the test's own.
struct Desktop {
    display: String,
    bus: String,
    _x: Kill,
    _dbus: Kill,
}

fn start_desktop() -> Desktop {
    let xvfb = find_program("Xvfb", "install the Debian package xvfb");
    // Xvfb picks a free display itself (and sees through lock files that dead servers left) and
    // writes its number to stdout.
    let mut child = Command::new(&xvfb)
        .args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1280x900x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb starts");
    let stdout = child.stdout.take().unwrap();
    let x = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let number = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("Xvfb names its display within 20 s");
    let display = format!(":{}", number.trim());
    assert!(
        number.trim().parse::<u32>().is_ok(),
        "Xvfb did not start: {number:?}"
    );
    let mut dbus = Command::new(find_program("dbus-daemon", "install dbus-daemon"))
        .args(["--session", "--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut address = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(dbus.stdout.take().unwrap()),
        &mut address,
    )
    .unwrap();
    Desktop {
        display,
        bus: address.trim().to_string(),
        _x: x,
        _dbus: Kill(dbus),
    }
}

struct Driver {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: Kill,
}

impl Driver {
    /// Starts tauri-driver with `env` (the app inherits it) and opens the app with `args`.
    async fn launch(
        desktop: &Desktop,
        env: &[(&str, String)],
        args: &[String],
    ) -> (Driver, Duration) {
        let port = free_port();
        let native = free_port();
        let mut command = Command::new(find_program(
            "tauri-driver",
            "run `cargo install tauri-driver --locked`",
        ));
        command
            .args([
                "--port",
                &port.to_string(),
                "--native-port",
                &native.to_string(),
            ])
            .arg("--native-driver")
            .arg(find_program(
                "WebKitWebDriver",
                "install the Debian package webkit2gtk-driver",
            ))
            .env("DISPLAY", &desktop.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &desktop.bus)
            .env("GDK_BACKEND", "x11")
            .env("WEBKIT_DISABLE_COMPOSITING_MODE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let driver = Kill(command.spawn().unwrap());
        wait_port(port);
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {"tauri:options": {
                "application": target_bin("cis2-agent"),
                "args": args,
            }}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_string();
        let driver = Driver {
            http,
            base,
            session,
            _driver: driver,
        };
        driver.wait_for("#screen h1", "").await;
        let drawn = started.elapsed();
        (driver, drawn)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    /// A WebDriver command of this session: its `value`, or Null if the driver could not be asked.
    async fn command(&self, path: &str, body: Option<Value>) -> Value {
        let request = match body {
            Some(body) => self.http.post(self.url(path)).json(&body),
            None => self.http.get(self.url(path)),
        };
        match request.send().await {
            Ok(response) => response
                .json::<Value>()
                .await
                .map(|v| v["value"].clone())
                .unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    async fn find(&self, css: &str) -> Option<String> {
        let found = self
            .command(
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().map(str::to_string)
    }

    async fn text(&self, element: &str) -> String {
        let text = self
            .command(&format!("/element/{element}/text"), None)
            .await;
        text.as_str().unwrap_or_default().to_string()
    }

    /// Waits until `css` is on screen and its text contains `words`; returns the element's text.
    async fn wait_for(&self, css: &str, words: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(element) = self.find(css).await {
                let text = self.text(&element).await;
                if text.contains(words) {
                    return text;
                }
            }
            if Instant::now() >= deadline {
                self.screenshot("failure").await;
                let body = self
                    .command(
                        "/execute/sync",
                        Some(json!({"script": "return document.getElementById('main').innerText", "args": []})),
                    )
                    .await;
                panic!("{css} with {words:?} did not appear within 30 s; the window shows: {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        // The page redraws a list when an event arrives, so an element found a moment ago may be gone
        // by the click ("stale element reference"): find it again, as a person would look again.
        for _ in 0..20 {
            self.wait_for(css, "").await;
            let Some(element) = self.find(css).await else {
                continue;
            };
            let answer = self
                .command(&format!("/element/{element}/click"), Some(json!({})))
                .await;
            if answer["error"] == "stale element reference" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert!(answer.is_null(), "click on {css}: {answer}");
            return;
        }
        panic!("{css} was redrawn under every one of 20 clicks");
    }

    /// Each of `controls` is inside the viewport, which is the window's default size, not covered
    /// by anything, and the page is not scrolled: what a person sees without scrolling.
    async fn assert_fits(&self, screen: &str, controls: &[&str]) {
        const SCRIPT: &str = r#"
            const problems = [];
            for (const css of arguments[0]) {
              const el = document.querySelector(css);
              if (!el) { problems.push(`${css}: not on the screen`); continue; }
              const r = el.getBoundingClientRect();
              if (r.height === 0 || r.top < 0 || r.left < 0 || r.bottom > innerHeight || r.right > innerWidth) {
                problems.push(`${css}: at ${Math.round(r.left)},${Math.round(r.top)} to ${Math.round(r.right)},${Math.round(r.bottom)}, outside ${innerWidth}x${innerHeight}`);
                continue;
              }
              const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
              if (!el.contains(hit)) problems.push(`${css}: covered by ${hit ? hit.outerHTML.slice(0, 80) : "nothing"}`);
            }
            if (scrollY !== 0) problems.push(`the page is scrolled by ${scrollY}px`);
            return { problems, width: innerWidth, height: innerHeight };"#;
        let answer = self
            .command(
                "/execute/sync",
                Some(json!({"script": SCRIPT, "args": [controls]})),
            )
            .await;
        assert_eq!(
            (answer["width"].as_u64(), answer["height"].as_u64()),
            (Some(460), Some(720)),
            "{screen}: the window is not at its default size: {answer}"
        );
        let problems = answer["problems"].as_array().cloned().unwrap_or_default();
        if !problems.is_empty() {
            self.screenshot(&format!("failure-{screen}")).await;
        }
        assert!(problems.is_empty(), "{screen}: {problems:?}");
    }

    async fn screenshot(&self, name: &str) {
        let encoded = self.command("/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a screenshot"))
            .unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci-artifacts/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn quit(self) {
        let _ = self.http.delete(self.url("")).send().await;
    }
}

/// Resident memory of `pid` and every process below it, in KiB.
fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        total += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            stack.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

fn app_pid(socket_dir: &Path) -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("cis2-agent.*{}", socket_dir.display())])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                // The `cis2-agent` launcher becomes the app: the process runs `cis2-agent-app`.
                .is_ok_and(|exe| exe.ends_with("cis2-agent-app"))
        })
}

fn config_main_binary_name() -> String {
    let config: Value = serde_json::from_str(include_str!("../../tauri.conf.json")).unwrap();
    config["mainBinaryName"].as_str().unwrap().to_string()
}

/// The `WM_CLASS` (instance, class) of the top-level windows titled as tauri.conf.json's window,
/// read with Debian's python3-xlib (as `scripts/bench-idle` reads the screen).
fn window_classes(display: &str) -> Vec<(String, String)> {
    let config: Value = serde_json::from_str(include_str!("../../tauri.conf.json")).unwrap();
    windows_titled(
        display,
        config["app"]["windows"][0]["title"].as_str().unwrap(),
    )
}

/// The `WM_CLASS` of each top-level window titled `title`.
fn windows_titled(display: &str, title: &str) -> Vec<(String, String)> {
    String::from_utf8_lossy(&x_windows(display, title, "list"))
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(instance, class)| (instance.to_string(), class.to_string()))
        .collect()
}

/// Asks each top-level window titled `title` to close, as a window manager's close button does.
fn close_windows_titled(display: &str, title: &str) {
    x_windows(display, title, "close");
}

/// Lists (`WM_CLASS`, a line each) or closes the top-level windows titled `title`, with Debian's
/// python3-xlib (as `scripts/bench-idle` reads the screen).
fn x_windows(display: &str, title: &str, action: &str) -> Vec<u8> {
    let script = r#"
import sys
from Xlib import X, display, protocol
d = display.Display(sys.argv[1])
name, utf8 = d.intern_atom("_NET_WM_NAME"), d.intern_atom("UTF8_STRING")
protocols, delete = d.intern_atom("WM_PROTOCOLS"), d.intern_atom("WM_DELETE_WINDOW")
for w in d.screen().root.query_tree().children:
    title = w.get_full_property(name, utf8)
    if title is None or title.value.decode() != sys.argv[2]:
        continue
    if sys.argv[3] == "close":
        data = (32, [delete, X.CurrentTime, 0, 0, 0])
        w.send_event(protocol.event.ClientMessage(window=w, client_type=protocols, data=data))
    else:
        print(*(w.get_wm_class() or ("-", "-")))
d.flush()
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, display, title, action])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "python3-xlib: {out:?}");
    out.stdout
}

fn write_config(dir: &Path, extra: &str) -> String {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"sandbox\"\n[agent]\nclient_policy = \"ask\"\ndata_dir = \"{}\"\nsocket = \"{}\"\n{extra}",
            dir.join("data").display(),
            dir.join("run/agent.sock").display()
        ),
    )
    .unwrap();
    config.display().to_string()
}

fn base_env(dir: &Path, user: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "BROWSER",
            target_bin("cis2-scripted-browser").display().to_string(),
        ),
        ("CIS2_TEST_USER", user.to_string()),
        (
            "CIS2_TEST_ROLE_FILE",
            dir.join("role").display().to_string(),
        ),
        ("XDG_DATA_HOME", dir.join("xdg-data").display().to_string()),
        (
            "XDG_CONFIG_HOME",
            dir.join("xdg-config").display().to_string(),
        ),
        ("XDG_RUNTIME_DIR", dir.join("xdg-run").display().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_change_role_approve_a_program_and_sign_out_in_the_real_window() {
    let _turn = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("xdg-run")).unwrap();
    let desktop = start_desktop();
    let config = write_config(dir.path(), "");
    let (driver, drawn) = Driver::launch(
        &desktop,
        &base_env(dir.path(), "555021935107"),
        &["--config".into(), config],
    )
    .await;
    println!(
        "FIGURE start-up to a drawn window under Xvfb: {} ms",
        drawn.as_millis()
    );

    driver
        .wait_for("#login", "Log in with my Care Identity")
        .await;
    driver.wait_for("#sandbox-banner", "SANDBOX").await;
    driver.screenshot("01-signed-out").await;
    // Docks and taskbars put the window under the desktop entry whose StartupWMClass (Tauri's
    // `.deb`: mainBinaryName) matches its WM_CLASS, though it runs in `cis2-agent-app`.
    // GNOME matches the instance, KDE the class whatever its case.
    let entry_class = config_main_binary_name();
    let classes = window_classes(&desktop.display);
    assert!(
        matches!(&classes[..], [(instance, class)]
            if *instance == entry_class && class.eq_ignore_ascii_case(&entry_class)),
        "the window's WM_CLASS {classes:?}, the desktop entry's StartupWMClass {entry_class}"
    );
    driver
        .assert_fits("signed out", &["#login", "#settings-link"])
        .await;

    driver.click("#login").await;
    let name = driver.wait_for("#name", "Amelia").await;
    let first_role = driver.wait_for("#role", "Access Role").await;
    driver.wait_for("#method", "Smartcard").await;
    driver.screenshot("02-signed-in").await;
    driver
        .assert_fits("signed in", &["#change-role", "#logout", "#settings-link"])
        .await;

    // Idle, signed in: the app and WebKit's processes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(pid) = app_pid(&dir.path().join("run")).or_else(|| app_pid(dir.path())) {
        println!(
            "FIGURE resident memory signed in and idle (app + WebKit processes): {:.1} MB",
            tree_rss_kib(pid) as f64 / 1024.0
        );
    }

    // Change role: the browser's role picker chooses another of Amelia's three roles.
    std::fs::write(dir.path().join("role"), "555021935107003").unwrap();
    driver.click("#change-role").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    // (While the window redraws, the role may read empty for a moment.)
    loop {
        let role = driver.wait_for("#role", "").await;
        if !role.is_empty() && role != first_role {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the role did not change from {first_role}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver.screenshot("03-role-changed").await;

    // A program the clinician has not met asks for a token: the window asks; Deny, then Allow once.
    let program = dir.path().join("ward-ehr");
    std::fs::copy(target_bin("cis2ctl"), &program).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let ask = |program: PathBuf, socket: PathBuf| {
        std::thread::spawn(move || {
            Command::new(program)
                .arg("--socket")
                .arg(socket)
                .arg("token")
                .output()
                .unwrap()
        })
    };
    let first = ask(program.clone(), socket.clone());
    driver
        .wait_for(
            ".app-approval h2",
            "ward-ehr wants to use your Care Identity sign-in",
        )
        .await;
    driver.screenshot("04-approval").await;
    driver
        .assert_fits(
            "approval",
            &[
                ".app-approval h2",
                "[id^='allow-once-']",
                "[id^='always-allow-']",
                "[id^='deny-']",
            ],
        )
        .await;
    driver.click("[id^='deny-']").await;
    let refused = first.join().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("The person signed in refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Deny is remembered: the settings page lists it, and forgetting it means the next request asks.
    driver.click("#settings-link").await;
    driver.wait_for("#screen h1", "Settings").await;
    driver.wait_for("#screen li", "Denied").await;
    driver.screenshot("05-settings").await;
    driver
        .assert_fits(
            "settings",
            &["label[for=autostart]", "[id^='forget-']", "#back"],
        )
        .await;
    // Start at sign-in: the checkbox writes this person's XDG autostart entry, and takes it away.
    let entry = dir.path().join("xdg-config/autostart/cis2-agent.desktop");
    assert!(!entry.exists());
    driver.click("label[for=autostart]").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !entry.exists() {
        assert!(Instant::now() < deadline, "no autostart entry was written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&entry).unwrap();
    assert!(text.contains("cis2-agent\" --minimized"), "{text}");
    driver.click("label[for=autostart]").await;
    while entry.exists() {
        assert!(Instant::now() < deadline, "the autostart entry stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver.click("[id^='forget-']").await;
    driver.wait_for("#no-programs", "No programs").await;
    driver.click("#back").await;
    let second = ask(program, socket);
    driver.click("[id^='allow-once-']").await;
    let allowed = second.join().unwrap();
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&allowed.stdout).trim().len() > 20,
        "a token"
    );

    driver.click("#logout").await;
    driver.wait_for("#login", "Log in").await;
    driver.screenshot("06-signed-out-again").await;
    assert!(!name.is_empty());
    driver.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_no_roles_expiring_and_locked_screens() {
    let _turn = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("xdg-run")).unwrap();
    let desktop = start_desktop();
    // Chris has no roles; the session may last 100 s (inside the 120 s warning). The lock comes from
    // the stand-in logind when the test says so, not from a timer a loaded machine could outrun.
    let logind = cis2_system_tests::StandinLogind::start();
    let config = write_config(
        dir.path(),
        "[session]\nabsolute_secs = 100\n[workstation]\non_os_lock = \"lock\"\n",
    );
    let mut env = base_env(dir.path(), "555021935109");
    env.push(("DBUS_SYSTEM_BUS_ADDRESS", logind.bus.address.clone()));
    let (driver, _) = Driver::launch(&desktop, &env, &["--config".into(), config]).await;
    driver.click("#login").await;
    driver.wait_for("#no-roles", "You have no roles").await;
    driver.wait_for("#expiring", "Your session ends in").await;
    driver.screenshot("07-no-roles-and-expiring").await;
    driver
        .assert_fits("no roles and expiring", &["#renew", "#logout"])
        .await;
    logind.emit("EmitLock");
    driver
        .wait_for("#locked-reason", "workstation was locked")
        .await;
    driver.screenshot("08-locked").await;
    driver.assert_fits("locked", &["#unlock", "#logout"]).await;
    driver.quit().await;
}

/// Started from a menu or at sign-in, nobody sees the app's error line: a start that fails is shown
/// in a dialog, and the app exits with the failure's code once the person closes it. Two failures:
/// a config mistake (found when the agent starts, inside Tauri) and an option mistyped in a shortcut
/// (found before Tauri and GTK start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_shown_in_a_dialog_until_the_person_closes_it() {
    let _turn = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("xdg-run")).unwrap();
    let desktop = start_desktop();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "environment = \"custom\"\n").unwrap();
    let (status, said) = fail_with_a_dialog(
        &desktop,
        dir.path(),
        &["--config".as_ref(), config.as_os_str()],
    );
    assert_eq!(status.code(), Some(2), "a config mistake exits 2: {said}");
    let line = format!(
        "cis2-agent: {}:1: environment = \"custom\" needs a [provider] section",
        config.display()
    );
    assert!(said.contains(&line), "{said}");

    let (status, said) = fail_with_a_dialog(&desktop, dir.path(), &["--minimised".as_ref()]);
    assert_eq!(status.code(), Some(2), "a mistyped option exits 2: {said}");
    assert!(
        said.contains("unexpected argument '--minimised'") && said.contains("'--minimized'"),
        "{said}"
    );
}

/// Runs the app with `args`, which must make it fail: waits for its dialog, checks that the app
/// waits for it, closes it, and gives the exit status and what the app wrote to stderr.
fn fail_with_a_dialog(
    desktop: &Desktop,
    dir: &Path,
    args: &[&std::ffi::OsStr],
) -> (std::process::ExitStatus, String) {
    let mut app = Command::new(target_bin("cis2-agent-app"))
        .args(args)
        .envs(base_env(dir, "555021935107"))
        .env("DISPLAY", &desktop.display)
        .env("DBUS_SESSION_BUS_ADDRESS", &desktop.bus)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the app starts");
    let title = cis2_agent_app::start_failure::TITLE;
    let deadline = Instant::now() + Duration::from_secs(60);
    while windows_titled(&desktop.display, title).is_empty() {
        let ended = app.try_wait().unwrap();
        assert!(
            ended.is_none(),
            "the app ended ({ended:?}) without a dialog"
        );
        assert!(
            Instant::now() < deadline,
            "no dialog titled {title:?} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        app.try_wait().unwrap().is_none(),
        "the app must wait for the person to close the dialog"
    );
    close_windows_titled(&desktop.display, title);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = app.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the app did not end after the dialog closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut app.stderr.take().unwrap(), &mut said).unwrap();
    (status, said)
}
