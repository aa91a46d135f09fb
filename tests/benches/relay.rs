//! `/v1/token` throughput and latency: `cis2-relay` and `cis2-mock-idp` as release processes on this
//! machine, each exchange a real code from a real (scripted) sign-in made beforehand. Two runs:
//! - closed loop, 50 exchanges always in flight: the most the pair can do (exchanges/s, latency);
//! - open loop, 200 exchanges/s offered by 50 concurrent clients: the latency at the target rate,
//!   measured from when each request was due (no coordinated omission).
//!
//! And how the work splits between the relay and the provider (CPU seconds of each process, and the
//! relay's own wall time per exchange from its metrics).
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p cis2-system-tests --bench relay`

use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use cis2_oidc::authorize::{self, AuthParams};
use cis2_system_tests::{Process, bin};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENT_ID: &str = "200000000010.apps.national";
const EXCHANGES: usize = 3000;
const WARM_UP: usize = 200;
const IN_FLIGHT: usize = 50;
const PACED: usize = 2000;
const PACED_RATE: f64 = 200.0;

/// user + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat; after the comm they are 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut idp = Process::start({
        let mut c = Command::new(bin("cis2-mock-idp"));
        c.args(["--port", "0", "--code-ttl", "900"]);
        c
    });
    let issuer = format!(
        "http://{}",
        idp.wait_for("http://", Duration::from_secs(30))
    );
    let admin = issuer.split("/openam").next().unwrap().to_string() + "/admin";
    let key = cis2_jose::SigningKey::generate(cis2_jose::Alg::RS512);
    std::fs::write(dir.path().join("key.pem"), key.to_pkcs8_pem()).unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\n\
             [signing]\nalg = \"RS512\"\nkeys = [\"key.pem\"]\n[limits]\nrequests_per_minute = 1000000\n"
        ),
    )
    .unwrap();
    let mut relay = Process::start({
        let mut c = Command::new(bin("cis2-relay"));
        c.arg("--config")
            .arg(dir.path().join("relay.toml"))
            .env("CIS2_RELAY_LOG", "warn")
            .stderr(Stdio::null());
        c
    });
    let relay_url = relay.wait_for("listening on ", Duration::from_secs(30));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    let client = json!({
        "client_id": CLIENT_ID,
        "auth_method": "private_key_jwt",
        "jwks": {"keys": [key.public_jwk()]},
        "redirect_uris": ["http://127.0.0.1/callback"],
        "id_token_signed_response_alg": "RS512",
        "refresh_tokens": true,
    });
    let registered = http
        .post(format!("{admin}/clients"))
        .json(&client)
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    eprintln!(
        "making {} codes through scripted sign-ins…",
        EXCHANGES + WARM_UP + PACED
    );
    let scopes: Vec<String> = [
        "openid",
        "profile",
        "nationalrbacaccess",
        "associatedorgs",
        "selectedrole",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let users = ["555021935107", "555021935108", "555021935109"];
    let made = Arc::new(Mutex::new(Vec::new()));
    let mut makers = Vec::new();
    for worker in 0..8 {
        let (issuer, scopes, made) = (issuer.clone(), scopes.clone(), made.clone());
        makers.push(tokio::spawn(async move {
            let mut browser = ScriptedBrowser::new(None);
            for i in (worker..EXCHANGES + WARM_UP + PACED).step_by(8) {
                let redirect_uri = "http://127.0.0.1:49152/callback";
                let request = authorize::build(
                    &format!("{issuer}/authorize"),
                    &AuthParams {
                        client_id: CLIENT_ID,
                        redirect_uri,
                        scopes: &scopes,
                        acr_values: None,
                        prompt: Some("login"),
                        max_age: None,
                    },
                );
                let mut script = Script::new(users[i % users.len()], "smartcard");
                script.follow_callback = false;
                let outcome = browser.sign_in(&request.url, &script).await.unwrap();
                let body = json!({
                    "code": outcome.param("code").unwrap(),
                    "code_verifier": request.code_verifier.expose(),
                    "redirect_uri": redirect_uri,
                })
                .to_string();
                made.lock().unwrap().push(body);
            }
        }));
    }
    for maker in makers {
        maker.await.unwrap();
    }
    let mut bodies = std::mem::take(&mut *made.lock().unwrap());
    let paced = bodies.split_off(WARM_UP + EXCHANGES);
    let measured = bodies.split_off(WARM_UP);
    let warm_up = bodies;

    let run = |bodies: Vec<String>| {
        let queue = Arc::new(Mutex::new(bodies));
        let http = http.clone();
        let url = format!("{relay_url}v1/token");
        async move {
            let mut workers = Vec::new();
            for _ in 0..IN_FLIGHT {
                let (queue, http, url) = (queue.clone(), http.clone(), url.clone());
                workers.push(tokio::spawn(async move {
                    let mut times = Vec::new();
                    loop {
                        let Some(body) = queue.lock().unwrap().pop() else {
                            break;
                        };
                        let started = Instant::now();
                        let response = http
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        let status = response.status();
                        let answer: Value = response.json().await.unwrap();
                        assert_eq!(status, 200, "{answer}");
                        assert!(answer["access_token"].is_string());
                        times.push(started.elapsed().as_secs_f64() * 1000.0);
                    }
                    times
                }));
            }
            let mut all = Vec::new();
            for worker in workers {
                all.extend(worker.await.unwrap());
            }
            all
        }
    };
    run(warm_up).await;
    let read_metrics = || async {
        http.get(format!("{relay_url}metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let metrics_before = read_metrics().await;
    let (relay_cpu, idp_cpu) = (cpu_secs(relay.child.id()), cpu_secs(idp.child.id()));
    let started = Instant::now();
    let mut times = run(measured).await;
    let wall = started.elapsed().as_secs_f64();
    let relay_cpu = cpu_secs(relay.child.id()) - relay_cpu;
    let idp_cpu = cpu_secs(idp.child.id()) - idp_cpu;
    let metrics = read_metrics().await;
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let n = times.len() as f64;
    let request_sum = metric_sum(
        &metrics,
        "cis2_relay_request_seconds_sum{endpoint=\"token\"} ",
    ) - metric_sum(
        &metrics_before,
        "cis2_relay_request_seconds_sum{endpoint=\"token\"} ",
    );
    let provider_sum = metric_sum(&metrics, "cis2_relay_provider_seconds_sum ")
        - metric_sum(&metrics_before, "cis2_relay_provider_seconds_sum ");
    println!(
        "relay /v1/token, {IN_FLIGHT} in flight, {} exchanges: {:.0} exchanges/s; p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        times.len(),
        n / wall,
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
    println!(
        "  CPU per exchange: relay {:.2} ms, provider {:.2} ms (relay {:.0}% of the two)",
        relay_cpu * 1000.0 / n,
        idp_cpu * 1000.0 / n,
        100.0 * relay_cpu / (relay_cpu + idp_cpu)
    );
    println!(
        "  wall time per exchange inside the relay: {:.1} ms, of which waiting for the provider {:.1} ms (relay's own {:.1} ms)",
        request_sum * 1000.0 / n,
        provider_sum * 1000.0 / n,
        (request_sum - provider_sum) * 1000.0 / n
    );

    // Open loop: request i is due at start + i/rate; 50 clients take turns; latency counts from the due time.
    let queue = Arc::new(Mutex::new(
        paced.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    queue.lock().unwrap().reverse();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (queue, http, url) = (queue.clone(), http.clone(), format!("{relay_url}v1/token"));
        workers.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let Some((i, body)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let due = started + Duration::from_secs_f64(i as f64 / PACED_RATE);
                tokio::time::sleep_until(due.into()).await;
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                let _ = response.bytes().await.unwrap();
                times.push(due.elapsed().as_secs_f64() * 1000.0);
            }
            times
        }));
    }
    let mut times = Vec::new();
    for worker in workers {
        times.extend(worker.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "relay /v1/token, {PACED_RATE:.0}/s offered by {IN_FLIGHT} concurrent clients, {} exchanges: {:.0} exchanges/s done; p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        times.len(),
        times.len() as f64 / wall,
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
    relay.kill();
    idp.kill();
}
