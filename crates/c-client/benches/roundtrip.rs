// The bench calls the exported C functions themselves, so it needs `unsafe` as a C caller would.
#![allow(unsafe_code)]

//! One caller's round trip through the C library beside the same request on a raw socket, and a cold
//! `cis2_open` to a token, against a sandbox agent with someone signed in. A fixed workload: 200 calls
//! to warm up, then 5,000 timed `cis2_get_token_no_auth` calls through the exported C functions and
//! 5,000 `token` requests written and read on a plain Unix socket (the floor: framing and the agent
//! alone); then 50 times a new handle (`cis2_open` + `cis2_get_token_no_auth` + `cis2_close`).
//!
//! Run: `cargo build --workspace --bins` (or `--release`), then
//! `cargo bench -p cis2-c-client --bench roundtrip`. The agent is `$CIS2_BENCH_AGENTD`, else
//! cis2-agentd beside this bench, else target/debug's; which one ran is printed.

use cis2_client::codes::CIS2_OK;
use cis2_client::ffi::{cis2_close, cis2_get_token_no_auth, cis2_open};
use cis2_system_tests::Process;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WARM_UP: usize = 200;
const CALLS: usize = 5000;
const OPENS: usize = 50;

fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let beside = exe.parent().and_then(Path::parent).unwrap().join(name);
    if beside.exists() {
        return beside;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/debug")
        .join(name)
}

fn percentiles(label: &str, mut micros: Vec<f64>) {
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label:<44} p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs   ({} calls)",
        at(0.5),
        at(0.99),
        micros[micros.len() - 1],
        micros.len()
    );
}

fn timed(calls: usize, mut call: impl FnMut()) -> Vec<f64> {
    (0..calls)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    let agentd = std::env::var_os("CIS2_BENCH_AGENTD")
        .map(PathBuf::from)
        .unwrap_or_else(|| program("cis2-agentd"));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("agent.sock");
    let mut command = Command::new(&agentd);
    command
        .args(["--sandbox", "--socket"])
        .arg(&socket)
        .env("BROWSER", program("cis2-scripted-browser"))
        .env_remove("CIS2_AGENT_CONFIG")
        .env("XDG_CONFIG_HOME", dir.path().join("no-config"))
        .env("XDG_DATA_HOME", dir.path().join("data"));
    let mut agent = Process::start(command);
    agent.wait_for("listening on ", Duration::from_secs(30));
    println!("agent: {}", agentd.display());

    let endpoint = CString::new(socket.to_str().unwrap()).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut used = 0usize;
    // SAFETY: a NUL-terminated endpoint; the handle is used below and closed once.
    let client = unsafe { cis2_open(endpoint.as_ptr()) };
    assert!(!client.is_null(), "cis2_open");
    let mut token = |min_valid: u32| {
        // SAFETY: a live handle, a buffer of buf.len() bytes, a local `used`.
        let rc = unsafe {
            cis2_get_token_no_auth(
                client,
                min_valid,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut used,
            )
        };
        assert_eq!(rc, CIS2_OK);
    };
    let login = Command::new(program("cis2ctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("login")
        .output()
        .unwrap();
    assert!(login.status.success(), "sign-in through cis2ctl");

    let mut raw = UnixStream::connect(&socket).unwrap();
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let mut line = String::new();
    let mut id = 0u64;
    let mut raw_token = || {
        id += 1;
        let request = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"token\",\"params\":{{\"min_valid_secs\":60}}}}\n"
        );
        raw.write_all(request.as_bytes()).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("access_token"));
    };

    for _ in 0..WARM_UP {
        token(60);
        raw_token();
    }
    // Interleaved in blocks, so a slow spell of a shared machine falls on both alike.
    let (mut through_library, mut raw_socket) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        through_library.extend(timed(CALLS / 10, || token(60)));
        raw_socket.extend(timed(CALLS / 10, &mut raw_token));
    }
    percentiles("cis2_get_token_no_auth (the C library)", through_library);
    percentiles("token on a raw Unix socket (floor)", raw_socket);
    // SAFETY: the handle from cis2_open above, closed once.
    unsafe { cis2_close(client) };

    let mut opens = Vec::new();
    for _ in 0..OPENS {
        let start = Instant::now();
        // SAFETY: as above; each handle is closed once, right after its token.
        unsafe {
            let client = cis2_open(endpoint.as_ptr());
            assert!(!client.is_null());
            let rc =
                cis2_get_token_no_auth(client, 60, buf.as_mut_ptr().cast(), buf.len(), &mut used);
            assert_eq!(rc, CIS2_OK);
            opens.push(start.elapsed().as_secs_f64() * 1e6);
            cis2_close(client);
        }
    }
    println!(
        "first cis2_open → token in this process: {:.1} µs",
        opens[0]
    );
    percentiles("cis2_open → token (new handle each)", opens);
    agent.kill();
}
