//! The window on Windows: the app as built, in the sandbox, must get its window drawn by WebView2
//! (the window process reports the first paint; the app logs it). Real Windows only: Wine 8 has no
//! WebView2 runtime, so under Wine this test skips and says so (docs/deployment.md lists what only a
//! real Windows shows). Run it there with `cargo test -p cis2-agent --test window_windows`.
#![cfg(windows)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Wine keeps its own settings under this key; Windows has none.
fn under_wine() -> bool {
    Command::new("reg")
        .args(["query", r"HKLM\Software\Wine"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_app_opens_its_window_through_webview2() {
    if under_wine() {
        eprintln!(
            "SKIPPED: the WebView2 window needs a real Windows (Wine has no WebView2 runtime); \
             run this test there"
        );
        return;
    }
    let pipe = format!(r"\\.\pipe\cis2-window-test-{}", std::process::id());
    let mut app = Command::new(env!("CARGO_BIN_EXE_cis2-agent"))
        .args(["--sandbox", "--socket", &pipe])
        .env("CIS2_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cis2-agent.exe starts");
    let (lines, log) = mpsc::channel();
    let stderr = app.stderr.take().expect("the app's stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // A cold WebView2 start (its browser process, a profile folder) takes seconds on a slow PC.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let drawn = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains("window drawn after it was asked for") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    // The window process ends when its stdin (held by the app) closes.
    let _ = app.kill();
    let _ = app.wait();
    assert!(
        drawn,
        "the window was not drawn within 60 s; the app said:\n{}",
        seen.join("\n")
    );
}
