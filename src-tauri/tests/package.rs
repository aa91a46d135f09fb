//! What the Linux package relies on, checked without building it: Tauri's `.deb` ships every program
//! of this crate in `/usr/bin` and runs `mainBinaryName` from its desktop entry; on Linux that
//! program is the launcher, which starts `cis2-agent-app` from beside itself. A package with the
//! launcher but not the app would not start at all (`packaging/check-deb.sh` checks a built `.deb`).
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::Command;

const LAUNCHER: &str = env!("CARGO_BIN_EXE_cis2-agent");
const APP: &str = env!("CARGO_BIN_EXE_cis2-agent-app");

fn main_binary_name() -> String {
    let config: serde_json::Value =
        serde_json::from_str(include_str!("../../tauri.conf.json")).unwrap();
    config["mainBinaryName"].as_str().unwrap().to_string()
}

fn file_name(path: &str) -> &str {
    Path::new(path).file_name().unwrap().to_str().unwrap()
}

#[test]
fn the_desktop_entry_runs_the_launcher_and_the_app_is_a_program_of_the_package() {
    assert_eq!(file_name(LAUNCHER), main_binary_name());
    assert_eq!(file_name(APP), format!("{}-app", main_binary_name()));
    assert_eq!(Path::new(LAUNCHER).parent(), Path::new(APP).parent());
}

/// `--version` is not a launch, so the launcher hands it to the app: the answer comes from the app
/// beside it, under the name the person ran.
#[test]
fn the_launcher_starts_the_app_beside_it() {
    let out = Command::new(LAUNCHER).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("cis2-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

/// What a package without the app would do: say so and fail, not hang or start something else.
#[test]
fn the_launcher_alone_fails_and_names_the_missing_app() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join(file_name(LAUNCHER));
    std::fs::copy(LAUNCHER, &alone).unwrap();
    let out = Command::new(&alone).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    let missing = dir.path().join(file_name(APP));
    assert!(
        said.contains(&format!("could not start {}", missing.display())),
        "{said}"
    );
}
