//! `token` from the cache over the socket under load: 50 concurrent clients on 2 cores, a fixed
//! workload, latency percentiles and throughput — and the same load against oidc-agent's socket
//! (`access_token` request) in the same run, when oidc-agent and bench/oidc-agent-setup.sh are present.
//!
//! The offered load runs twice: from 50 blocking client threads (each call's latency includes the
//! wait of its generator thread for a core, behind 49 others and the agent), and from one thread that
//! drives the same 50 connections with epoll; the target is reported for both.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p cis2-system-tests --bench ipc`
//! (`CIS2_BENCH_AUDIT_SYNC=1` for the agent with `[agent] audit_sync = true`). Every answer waits for
//! its audit record to be written (group commit), so this measures that too. `CIS2_BENCH_PIN=1` gives
//! the agent and the generator a core each. Each offered-load run also prints the core time the
//! hypervisor took meanwhile (steal): on a shared VM, a run with steal has a tail whatever the agent.

use cis2_system_tests::{Agent, OidcAgent, Process, bin};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 50;
const CALLS_PERSISTENT: usize = 4000;
const CALLS_PER_CONNECTION: usize = 400;

struct Figures {
    calls: usize,
    seconds: f64,
    latencies_us: Vec<f64>,
}

impl Figures {
    /// One latency per call made.
    fn of(mut latencies_us: Vec<f64>, seconds: f64) -> Figures {
        latencies_us.sort_by(f64::total_cmp);
        Figures {
            calls: latencies_us.len(),
            seconds,
            latencies_us,
        }
    }

    fn line(&self, label: &str) -> String {
        let p =
            |q: f64| self.latencies_us[((self.latencies_us.len() - 1) as f64 * q).round() as usize];
        format!(
            "{label:<52} {:>8.0} req/s   p50 {:>6.0} µs   p99 {:>6.0} µs   max {:>6.0} µs   ({} calls)",
            self.calls as f64 / self.seconds,
            p(0.5),
            p(0.99),
            self.latencies_us[self.latencies_us.len() - 1],
            self.calls
        )
    }
}

fn load(clients: usize, calls: usize, one: impl Fn() -> Box<dyn FnMut() + Send> + Sync) -> Figures {
    let start = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let mut call = one();
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(calls);
                    for _ in 0..calls {
                        let t = Instant::now();
                        call();
                        mine.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<f64>>()
    });
    Figures::of(latencies, start.elapsed().as_secs_f64())
}

/// Open-loop load: `clients` threads together offering `rate` calls a second for `seconds`. Latency is
/// measured from each call's scheduled time, so a stall also counts against the calls queued behind it.
fn paced(
    clients: usize,
    rate: f64,
    seconds: f64,
    one: impl Fn() -> Box<dyn FnMut() + Send> + Sync,
) -> Figures {
    let per_client = rate / clients as f64;
    let interval = Duration::from_secs_f64(1.0 / per_client);
    let calls = (per_client * seconds) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let latencies = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|k| {
                let mut call = one();
                let offset = interval.mul_f64(k as f64 / clients as f64);
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(calls);
                    for i in 0..calls {
                        let due = start + offset + interval * i as u32;
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        call();
                        mine.push(due.elapsed().as_secs_f64() * 1e6);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<f64>>()
    });
    Figures::of(latencies, start.elapsed().as_secs_f64())
}

/// The same open-loop load as [`paced`], from one thread: `clients` connections, each with its own
/// schedule and one call in flight at a time (as a blocking client), driven by one epoll loop whose
/// timer (a timerfd, nanosecond-exact) fires at the next call due. Fifty generator threads on these two
/// cores need most of a core themselves and wait for it behind one another, and that wait counts as
/// the agent's latency; one loop offers the same calls for a fraction of the CPU. Latency is still
/// measured from each call's scheduled time, and the answer is checked (its id, an access token).
/// Also returned: how late the generator itself wrote each call (from its scheduled time), the share
/// of the latency that no agent could have avoided.
/// The part of a `token` answer the one-thread generator checks: its id and that it holds a token.
#[derive(serde::Deserialize)]
struct TokenAnswer<'a> {
    id: usize,
    #[serde(borrow)]
    result: TokenResult<'a>,
}

#[derive(serde::Deserialize)]
struct TokenResult<'a> {
    access_token: &'a str,
}

fn paced_from_one_thread(
    clients: usize,
    rate: f64,
    seconds: f64,
    socket: &Path,
) -> (Figures, Figures) {
    use rustix::event::epoll;
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

    struct Connection {
        stream: UnixStream,
        offset: Duration,
        next: usize,
        in_flight: Option<Instant>,
        received: Vec<u8>,
    }
    let per_client = rate / clients as f64;
    let interval = Duration::from_secs_f64(1.0 / per_client);
    let calls = (per_client * seconds) as usize;
    let poller = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
    let timer = rustix::time::timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
    )
    .unwrap();
    let timer_key = u64::MAX;
    epoll::add(
        &poller,
        &timer,
        epoll::EventData::new_u64(timer_key),
        epoll::EventFlags::IN,
    )
    .unwrap();
    let mut connections: Vec<Connection> = (0..clients)
        .map(|k| {
            let stream = UnixStream::connect(socket).unwrap();
            stream.set_nonblocking(true).unwrap();
            epoll::add(
                &poller,
                &stream,
                epoll::EventData::new_u64(k as u64),
                epoll::EventFlags::IN,
            )
            .unwrap();
            Connection {
                stream,
                offset: interval.mul_f64(k as f64 / clients as f64),
                next: 0,
                in_flight: None,
                received: Vec::new(),
            }
        })
        .collect();
    let mut latencies = Vec::with_capacity(clients * calls);
    let mut sent_late = Vec::with_capacity(clients * calls);
    let mut events = Vec::with_capacity(clients + 1);
    let start = Instant::now() + Duration::from_millis(50);
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        let mut busy = false;
        for connection in connections.iter_mut() {
            if connection.in_flight.is_some() {
                busy = true;
                continue;
            }
            if connection.next == calls {
                continue;
            }
            let due = start + connection.offset + interval * connection.next as u32;
            if due <= now {
                let request = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"token\",\"params\":{{}}}}\n",
                    connection.next
                );
                connection.stream.write_all(request.as_bytes()).unwrap();
                sent_late.push(due.elapsed().as_secs_f64() * 1e6);
                connection.in_flight = Some(due);
                busy = true;
            } else {
                earliest = Some(earliest.map_or(due, |e| e.min(due)));
            }
        }
        if !busy && earliest.is_none() {
            break;
        }
        // The timer is set again only when the next call due is another one (a zero setting stops it).
        if earliest != armed {
            armed = earliest;
            let wait = earliest.map_or(Duration::ZERO, |due| {
                due.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1))
            });
            let setting = Itimerspec {
                it_interval: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: Timespec {
                    tv_sec: wait.as_secs() as _,
                    tv_nsec: wait.subsec_nanos() as _,
                },
            };
            rustix::time::timerfd_settime(&timer, TimerfdTimerFlags::empty(), &setting).unwrap();
        }
        events.clear();
        epoll::wait(&poller, rustix::buffer::spare_capacity(&mut events), None).unwrap();
        for event in events.iter() {
            let key = event.data.u64();
            if key == timer_key {
                let mut expirations = [0u8; 8];
                let _ = rustix::io::read(&timer, &mut expirations);
                armed = None;
                continue;
            }
            let connection = &mut connections[key as usize];
            // One read per readiness: the poll is level-triggered, so what is left is reported again.
            let mut chunk = [0u8; 16 * 1024];
            match connection.stream.read(&mut chunk) {
                Ok(0) => panic!("the agent closed a connection"),
                Ok(n) => connection.received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
            let arrived = Instant::now();
            while let Some(end) = connection.received.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = connection.received.drain(..=end).collect();
                // Read into a typed answer, borrowing the token: a generic JSON tree per answer was
                // a good part of the generator's time, and its lateness counts as the agent's.
                let answer: TokenAnswer = serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line)));
                assert_eq!(answer.id, connection.next);
                assert!(!answer.result.access_token.is_empty());
                let due = connection
                    .in_flight
                    .take()
                    .expect("an answer to a call in flight");
                latencies.push((arrived - due).as_secs_f64() * 1e6);
                connection.next += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    (
        Figures::of(latencies, seconds),
        Figures::of(sent_late, seconds),
    )
}

fn cis2_persistent(socket: PathBuf) -> Box<dyn FnMut() + Send> {
    let mut client = cis2_ipc_client::Client::connect(&socket).unwrap();
    Box::new(move || {
        let answer = client.call("token", serde_json::json!({})).unwrap();
        assert!(answer["access_token"].is_string());
    })
}

/// Calls the agent refused because one program (this bench: all 50 clients are one executable) held
/// its most connections: a closed connection's place is given back when the agent has seen it close,
/// which under this load can come after the same client's next connect. Counted, not hidden.
static REFUSED_PER_PROGRAM: AtomicUsize = AtomicUsize::new(0);

fn cis2_per_connection(socket: PathBuf) -> Box<dyn FnMut() + Send> {
    Box::new(move || {
        let mut client = cis2_ipc_client::Client::connect(&socket).unwrap();
        match client.call("token", serde_json::json!({})) {
            Ok(answer) => assert!(answer["access_token"].is_string()),
            Err(cis2_ipc_client::ClientError::Rpc {
                code: -32000,
                message,
            }) if message.contains("the most one program may have") => {
                REFUSED_PER_PROGRAM.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("{e}"),
        }
    })
}

/// The refusals counted since the last call, as a note for the figures line.
fn refused_note() -> String {
    match REFUSED_PER_PROGRAM.swap(0, Ordering::Relaxed) {
        0 => String::new(),
        n => format!("   ({n} refused: the per-program connection cap; their latency included)"),
    }
}

/// oidc-agent's IPC: one JSON request per connection, one JSON answer.
fn oidc_agent_call(socket: &Path, account: &str) {
    let mut stream = UnixStream::connect(socket).unwrap();
    let request = serde_json::json!({"request": "access_token", "account": account, "min_valid_period": 0, "application_hint": "bench"});
    stream.write_all(request.to_string().as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&buf) {
            assert_eq!(answer["status"], "success", "{answer}");
            return;
        }
    }
    panic!("oidc-agent answered {:?}", String::from_utf8_lossy(&buf));
}

/// The time the hypervisor ran something else on this virtual machine's cores (`steal` in
/// /proc/stat): a core taken away for milliseconds stalls whatever ran on it, agent or generator, and
/// on a shared VM that is the tail's usual cause. Shown beside a run so that its figures can be read.
struct StolenTime(Option<u64>);

impl StolenTime {
    fn start() -> StolenTime {
        StolenTime(Self::ticks())
    }

    /// Steal over all cores, in clock ticks (USER_HZ, 100 a second on Linux).
    fn ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
        cpu.split_whitespace().nth(7)?.parse().ok()
    }

    fn note(&self) -> String {
        match (self.0, Self::ticks()) {
            (Some(before), Some(after)) => format!(
                "   (stolen by the hypervisor meanwhile: {} ms of core time)",
                after.saturating_sub(before) * 10
            ),
            _ => String::new(),
        }
    }
}

/// Runs this thread, and the threads and programs it starts from now on, on these cores only.
fn run_on_cores(cores: &[usize]) {
    let mut set = rustix::thread::CpuSet::new();
    for &core in cores {
        set.set(core);
    }
    rustix::thread::sched_setaffinity(None, &set).expect("CIS2_BENCH_PIN needs cores 0 and 1");
}

/// The target, judged on one offered-load run: p99 <= 1 ms at >= 20,000 req/s.
fn target_line(generator: &str, figures: &Figures) -> String {
    let p99 =
        figures.latencies_us[((figures.latencies_us.len() - 1) as f64 * 0.99).round() as usize];
    let achieved = figures.calls as f64 / figures.seconds;
    let met = p99 <= 1000.0 && achieved >= 19_800.0;
    format!(
        "target: p99 <= 1 ms at >= 20,000 req/s ({generator}) -> {} (p99 {p99:.0} µs at {achieved:.0} req/s)",
        if met { "met" } else { "NOT met" }
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut idp_command = Command::new(bin("cis2-mock-idp"));
    idp_command.args(["--port", "0"]);
    let mut idp = Process::start(idp_command);
    let issuer = format!(
        "http://{}",
        idp.wait_for("http://", Duration::from_secs(30))
    );
    // CIS2_BENCH_AUDIT_SYNC=1: with an fdatasync of the audit log per batch ([agent] audit_sync).
    let audit_sync = std::env::var("CIS2_BENCH_AUDIT_SYNC").is_ok_and(|v| v == "1");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("environment = \"custom\"\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"100000000001.apps.national\"\n[agent]\nclient_policy = \"allow\"\naudit_sync = {audit_sync}\n[provider.exchange]\nmethod = \"none\"\n"),
    )
    .unwrap();
    // CIS2_BENCH_PIN=1: the agent on core 0, the load generator on core 1 (the agent's threads
    // inherit the core it is started from), so that neither waits for a core behind the other, as
    // on a clinician's PC with more cores than two. The hypervisor can still take either core away.
    let pinned = std::env::var("CIS2_BENCH_PIN").is_ok_and(|v| v == "1");
    if pinned {
        run_on_cores(&[0]);
    }
    let agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("CIS2_LOG", "warn")],
    );
    if pinned {
        run_on_cores(&[1]);
    }
    assert!(agent.ctl(&["login"]).status.success());
    println!(
        "token from the cache over the local socket, {CLIENTS} concurrent clients, release build, 2 cores, audit_sync = {audit_sync}"
    );
    println!(
        "{}",
        if pinned {
            "(pinned: the agent on core 0, the load generator on core 1)"
        } else {
            "(the load generator shares the 2 cores with the agent; CIS2_BENCH_PIN=1 gives each a core)"
        }
    );
    let socket = agent.socket.clone();
    // Warm-up.
    load(CLIENTS, 100, || cis2_persistent(socket.clone()));
    println!("-- offered load: 20,000 req/s for 5 s, latency from each call's scheduled time");
    let stolen = StolenTime::start();
    let offered = paced(CLIENTS, 20_000.0, 5.0, || cis2_persistent(socket.clone()));
    println!(
        "{}{}",
        offered.line("cis2-agent, persistent connections"),
        stolen.note()
    );
    let stolen = StolenTime::start();
    let (from_one_thread, sent_late) = paced_from_one_thread(CLIENTS, 20_000.0, 5.0, &socket);
    println!(
        "{}",
        from_one_thread.line("cis2-agent, persistent, one generator thread")
    );
    println!(
        "{}{}",
        sent_late.line("  of which the generator's own lateness in writing"),
        stolen.note()
    );
    let offered_per_connection = paced(CLIENTS, 20_000.0, 5.0, || {
        cis2_per_connection(socket.clone())
    });
    println!(
        "{}{}",
        offered_per_connection.line("cis2-agent, a new connection per call"),
        refused_note()
    );
    for (generator, figures) in [
        ("50 generator threads", &offered),
        ("one generator thread", &from_one_thread),
    ] {
        println!("{}", target_line(generator, figures));
    }
    println!("-- saturation: every client calls back to back");
    let persistent = load(CLIENTS, CALLS_PERSISTENT, || {
        cis2_persistent(socket.clone())
    });
    println!("{}", persistent.line("cis2-agent, persistent connections"));
    let per_connection = load(CLIENTS, CALLS_PER_CONNECTION, || {
        cis2_per_connection(socket.clone())
    });
    println!(
        "{}{}",
        per_connection.line("cis2-agent, a new connection per call"),
        refused_note()
    );
    let rate = persistent.calls as f64 / persistent.seconds;
    if pinned {
        // oidc-agent and its load share both cores, as they always have.
        run_on_cores(&[0, 1]);
    }

    if let Some(oidc) = OidcAgent::start(&issuer, &dir.path().join("oidc-agent")) {
        let (oidc_socket, account) = (oidc.socket.clone(), oidc.account.clone());
        load(CLIENTS, 20, || {
            let (s, a) = (oidc_socket.clone(), account.clone());
            Box::new(move || oidc_agent_call(&s, &a))
        });
        let theirs_offered = paced(CLIENTS, 20_000.0, 5.0, || {
            let (s, a) = (oidc_socket.clone(), account.clone());
            Box::new(move || oidc_agent_call(&s, &a))
        });
        println!("-- oidc-agent, same offered load (its protocol: a connection per call)");
        println!("{}", theirs_offered.line("oidc-agent 4.2.6, access_token"));
        let theirs = load(CLIENTS, CALLS_PER_CONNECTION, || {
            let (s, a) = (oidc_socket.clone(), account.clone());
            Box::new(move || oidc_agent_call(&s, &a))
        });
        println!("-- oidc-agent, saturation");
        println!("{}", theirs.line("oidc-agent 4.2.6, access_token"));
        let ours_rate = per_connection.calls as f64 / per_connection.seconds;
        let theirs_rate = theirs.calls as f64 / theirs.seconds;
        println!(
            "ratio (same protocol shape, a connection per call): cis2-agent/oidc-agent throughput {:.2}",
            ours_rate / theirs_rate
        );
        println!(
            "ratio (each at its best: cis2 persistent vs oidc-agent): {:.2}",
            rate / theirs_rate
        );
    } else {
        println!("oidc-agent: not measured (needs oidc-agent-cli and bench/oidc-agent-setup.sh)");
    }
    idp.kill();
}
