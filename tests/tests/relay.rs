//! `cis2-mock-idp`, `cis2-relay` (one or two, with a real `redis-server` between them), `cis2-agentd` and
//! `cis2ctl` as processes: sign-in through the relay with a `private_key_jwt` client the provider checks
//! against the relay's published keys, a key rotation without a failed sign-in, and CIS2's back-channel
//! logout reaching a clinician's programs.

use cis2_jose::{Alg, SigningKey};
use cis2_system_tests::{Agent, Process, bin, json, stderr, stdout};
use serde_json::{Value, json};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENT_ID: &str = "200000000009.apps.national";
const BEN: &str = "555021935108";

fn curl(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-s", "-w", "\n%{http_code}", "-X", method]);
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "-d", body]);
    }
    let out = command.arg(url).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

struct Idp {
    _process: Process,
    issuer: String,
    admin: String,
}

fn start_idp(extra: &[&str]) -> Idp {
    let mut command = Command::new(bin("cis2-mock-idp"));
    command.args(["--port", "0"]).args(extra);
    let mut process = Process::start(command);
    let issuer = format!(
        "http://{}",
        process.wait_for("http://", Duration::from_secs(30))
    );
    let admin = issuer.split("/openam").next().unwrap().to_string() + "/admin";
    Idp {
        _process: process,
        issuer,
        admin,
    }
}

struct Relay {
    process: Process,
    url: String,
    log: PathBuf,
}

/// Writes `relay-<name>.toml` and starts the relay on `port` (0: any).
fn start_relay(
    dir: &Path,
    name: &str,
    issuer: &str,
    port: u16,
    keys: &[&str],
    active: &str,
    redis: Option<&str>,
) -> Relay {
    let config = dir.join(format!("relay-{name}.toml"));
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    let redis = redis
        .map(|r| format!("redis_url = \"{r}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "[relay]\nlisten = \"127.0.0.1:{port}\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n{redis}\
             [provider]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\n\
             [signing]\nalg = \"RS512\"\nkeys = [{}]\nactive = \"{active}\"\n",
            keys.join(", ")
        ),
    )
    .unwrap();
    let log = dir.join(format!("relay-{name}.log"));
    let mut command = Command::new(bin("cis2-relay"));
    command
        .arg("--config")
        .arg(&config)
        .env("CIS2_RELAY_LOG", "debug")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let mut process = Process::start(command);
    let url = process.wait_for("listening on ", Duration::from_secs(30));
    Relay { process, url, log }
}

fn register_client(idp: &Idp, relay_for_keys: &str, relay_for_logout: &str) {
    let client = json!({
        "client_id": CLIENT_ID,
        "auth_method": "private_key_jwt",
        "jwks_uri": format!("{relay_for_keys}.well-known/jwks.json"),
        "redirect_uris": ["http://127.0.0.1/callback"],
        "backchannel_logout_uri": format!("{relay_for_logout}backchannel-logout"),
        "id_token_signed_response_alg": "RS512",
        "refresh_tokens": true,
        "rotate_refresh_tokens": true,
    });
    let (status, body) = curl(
        "POST",
        &format!("{}/clients", idp.admin),
        Some(&client.to_string()),
    );
    assert_eq!(status, 200, "{body}");
}

fn agent_config(dir: &Path, issuer: &str, relay_url: &str) -> String {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\n\n\
             [provider.exchange]\nmethod = \"relay\"\nrelay_url = \"{relay_url}\"\n\n\
             [agent]\nclient_policy = \"allow\"\nstore = \"memory\"\n"
        ),
    )
    .unwrap();
    config.to_str().unwrap().to_string()
}

fn write_key(dir: &Path, name: &str) -> SigningKey {
    let key = SigningKey::generate(Alg::RS512);
    std::fs::write(dir.join(name), key.to_pkcs8_pem()).unwrap();
    key
}

fn published_kids(relay: &str) -> Vec<String> {
    let (status, body) = curl("GET", &format!("{relay}.well-known/jwks.json"), None);
    assert_eq!(status, 200);
    let jwks: Value = serde_json::from_str(&body).unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

/// Signs in through cis2ctl and checks who came back.
fn sign_in(agent: &Agent) -> Value {
    let login = agent.ctl(&["login", "--json"]);
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    let login = json(&login);
    assert_eq!(login["state"], "signed_in");
    assert_eq!(login["user"]["uid"], BEN);
    login
}

#[test]
fn sign_in_through_the_relay_refresh_and_a_key_rotation_without_a_failed_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    // 4 s tokens, shorter than twice the agent's 60 s margin: it renews through the relay at half
    // their life, ~2 s after signing in.
    let idp = start_idp(&["--access-token-ttl", "4"]);
    let old = write_key(dir.path(), "2026-11.pem");
    let new = write_key(dir.path(), "2027-02.pem");
    let relay = start_relay(
        dir.path(),
        "a",
        &idp.issuer,
        0,
        &["2026-11.pem"],
        "2026-11.pem",
        None,
    );
    let port: u16 = relay
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    register_client(&idp, &relay.url, &relay.url);
    let config = agent_config(dir.path(), &idp.issuer, &relay.url);
    let agent = Agent::start(
        dir.path(),
        &["--config", &config],
        &[("CIS2_TEST_USER", BEN)],
    );

    let login = sign_in(&agent);
    assert_eq!(login["user"]["selected_role"]["code"], "S8000:G8000:R8001");
    assert_eq!(login["user"]["assurance"]["acr"], "AAL2_OR_AAL3_ANY");
    let first = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert!(first.len() > 20);
    // The background renewal goes through the relay's /v1/refresh.
    let mut second = first.clone();
    wait_until("a renewal through the relay", || {
        second = stdout(&agent.ctl(&["token"])).trim().to_string();
        second != first && !second.is_empty()
    });
    let second = second.as_str();
    // Debug logging is on, and still no token appears in the relay's log.
    let log = std::fs::read_to_string(&relay.log).unwrap();
    assert!(!log.is_empty());
    assert!(
        !log.contains(&first) && !log.contains(second),
        "the relay never logs a token"
    );
    assert!(agent.ctl(&["logout"]).status.success());
    assert_eq!(published_kids(&relay.url), vec![old.kid().to_string()]);

    // Rotation, step by step as docs/deployment.md says; a sign-in after each step.
    let steps: [(&[&str], &str, Vec<&str>); 3] = [
        // 1. publish the next key beside the active one
        (
            &["2026-11.pem", "2027-02.pem"],
            "2026-11.pem",
            vec![old.kid(), new.kid()],
        ),
        // 2. sign with the next key (the old one stays published for assertions in flight)
        (
            &["2026-11.pem", "2027-02.pem"],
            "2027-02.pem",
            vec![old.kid(), new.kid()],
        ),
        // 3. retire the old key
        (&["2027-02.pem"], "2027-02.pem", vec![new.kid()]),
    ];
    let mut relay = relay;
    for (keys, active, kids) in steps {
        relay.process.kill();
        relay = start_relay(dir.path(), "a", &idp.issuer, port, keys, active, None);
        assert_eq!(published_kids(&relay.url), kids);
        sign_in(&agent);
        assert!(agent.ctl(&["logout"]).status.success());
    }
}

/// `redis-server` on a free port, with nothing saved to disk.
struct Redis {
    child: std::process::Child,
    port: u16,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis(dir: &Path) -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect(
            "redis-server is installed (scripts/test installs the Debian package redis-server)",
        );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Redis {
        child,
        port,
        url: format!("redis://127.0.0.1:{port}/"),
    }
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn subscribers(relay: &str) -> u64 {
    let (_, metrics) = curl("GET", &format!("{relay}metrics"), None);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("cis2_relay_subscribers "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Signs Ben in through `agent_relay`, has the provider end his session with its logout sent to
/// `logout_relay`, and returns how long until a watching client saw `signed_out`.
fn logout_reaches_the_client(
    dir: &Path,
    idp: &Idp,
    logout_relay: &str,
    agent_relay: &str,
) -> Duration {
    logout_reaches_the_client_around(dir, idp, logout_relay, agent_relay, || {}, |_| {})
}

/// The same, with `before` run just before the provider's logout and `after` just after it.
fn logout_reaches_the_client_around(
    dir: &Path,
    idp: &Idp,
    logout_relay: &str,
    agent_relay: &str,
    before: impl FnOnce(),
    after: impl FnOnce(&Agent),
) -> Duration {
    register_client(idp, agent_relay, logout_relay);
    let config = agent_config(dir, &idp.issuer, agent_relay);
    let agent = Agent::start(dir, &["--config", &config], &[("CIS2_TEST_USER", BEN)]);
    sign_in(&agent);
    wait_until("the agent's subscription", || subscribers(agent_relay) == 1);
    let mut watcher = {
        let mut command = Command::new(bin("cis2ctl"));
        command.arg("--socket").arg(&agent.socket).arg("watch");
        Process::start(command)
    };
    // `watch` subscribes before it prints anything; a status call after it proves it is listening.
    std::thread::sleep(Duration::from_millis(200));

    before();
    let started = Instant::now();
    let (status, body) = curl(
        "POST",
        &format!("{}/backchannel-logout", idp.admin),
        Some(&json!({"sub": BEN}).to_string()),
    );
    assert_eq!(status, 200, "{body}");
    let deliveries: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(deliveries["deliveries"][0]["status"], 200, "{deliveries}");
    after(&agent);
    watcher.wait_for(
        "{\"reason\":\"the Care Identity session was ended centrally",
        Duration::from_secs(15),
    );
    let took = started.elapsed();
    let status = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(status["state"], "signed_out");
    let token = agent.ctl(&["token"]);
    assert_eq!(token.status.code(), Some(1), "no token after the logout");
    took
}

#[test]
fn a_back_channel_logout_signs_the_agent_out_and_its_clients_hear_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let idp = start_idp(&[]);
    write_key(dir.path(), "key.pem");
    let relay = start_relay(
        dir.path(),
        "a",
        &idp.issuer,
        0,
        &["key.pem"],
        "key.pem",
        None,
    );
    let took = logout_reaches_the_client(dir.path(), &idp, &relay.url, &relay.url);
    eprintln!("back-channel logout to client's signed_out (one relay): {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn with_redis_a_logout_received_by_one_relay_reaches_an_agent_subscribed_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(dir.path());
    let idp = start_idp(&[]);
    let (a, b) = two_relays(dir.path(), &idp, &redis.url, &redis.url);
    // The provider posts its logout to A; the agent signed in, and subscribed, through B.
    let took = logout_reaches_the_client(dir.path(), &idp, &a.url, &b.url);
    eprintln!("back-channel logout to client's signed_out (across relays via Redis): {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (_, metrics_a) = curl("GET", &format!("{}metrics", a.url), None);
    let (_, metrics_b) = curl("GET", &format!("{}metrics", b.url), None);
    assert!(
        metrics_a.contains("cis2_relay_logout_tokens_accepted_total 1\n"),
        "{metrics_a}"
    );
    assert!(
        metrics_b.contains("cis2_relay_logout_tokens_accepted_total 0\n"),
        "{metrics_b}"
    );
    assert!(
        metrics_b.contains("cis2_relay_logout_events_delivered_total 1\n"),
        "{metrics_b}"
    );
}

/// A TCP forwarder to a local port that the test can cut — every connection dropped, new ones
/// refused — and restore: a network fault between one relay and Redis.
struct Cutter {
    url: String,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cutter {
    fn start(target: u16) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, live) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(Vec::<TcpStream>::new())),
        );
        let (is_cut, connections) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if is_cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut connections = connections.lock().unwrap();
                for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                connections.push(inbound);
                connections.push(outbound);
            }
        });
        Cutter {
            url: format!("redis://127.0.0.1:{port}/"),
            cut,
            live,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.live.lock().unwrap().drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Relays A and B with one key, each with its Redis URL, both connected to Redis.
fn two_relays(dir: &Path, idp: &Idp, redis_a: &str, redis_b: &str) -> (Relay, Relay) {
    write_key(dir, "key.pem");
    let [a, b] = [("a", redis_a), ("b", redis_b)].map(|(name, redis)| {
        start_relay(
            dir,
            name,
            &idp.issuer,
            0,
            &["key.pem"],
            "key.pem",
            Some(redis),
        )
    });
    for relay in [&a, &b] {
        wait_until("the Redis subscription", || redis_up(relay));
    }
    (a, b)
}

fn redis_up(relay: &Relay) -> bool {
    curl("GET", &format!("{}healthz", relay.url), None)
        .1
        .contains("\"redis\":true")
}

#[test]
fn with_redis_a_relay_cut_off_from_it_catches_up_on_the_logout_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(dir.path());
    let cutter = Cutter::start(redis.port);
    let idp = start_idp(&[]);
    // B, which holds the agent's event stream, reaches Redis only through the cutter.
    let (a, b) = two_relays(dir.path(), &idp, &redis.url, &cutter.url);
    let took = logout_reaches_the_client_around(
        dir.path(),
        &idp,
        &a.url,
        &b.url,
        || {
            cutter.cut();
            wait_until("B to lose Redis", || !redis_up(&b));
        },
        |agent| {
            // A took the logout while B could not hear of it: the clinician is still signed in.
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(
                json(&agent.ctl(&["status", "--json"]))["state"],
                "signed_in"
            );
            cutter.restore();
        },
    );
    eprintln!(
        "back-channel logout to client's signed_out with B cut off from Redis for a while: {took:?}"
    );
    let (_, metrics_b) = curl("GET", &format!("{}metrics", b.url), None);
    assert!(
        metrics_b.contains("cis2_relay_logout_events_delivered_total 1\n"),
        "{metrics_b}"
    );
}
