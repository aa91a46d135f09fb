//! Sign-in overhead inside the agent: from the moment the browser's callback reaches the loopback
//! listener to a validated session (code exchange, ID token checks, userinfo, user model), minus the time
//! the provider itself spent answering the token and userinfo calls. Fixed workload: 200 sign-ins of the
//! same test user against the sandbox provider on loopback, private_key_jwt RS512.
//!
//! Run: `cargo bench -p cis2-core --bench signin`

use cis2_core::browser::Browser;
use cis2_core::clock::SystemClock;
use cis2_core::http::HttpClient;
use cis2_core::oidc::discovery::Discovery;
use cis2_core::oidc::exchange::ClientAuth;
use cis2_core::oidc::rp::{ClientSettings, Exchange, RelyingParty};
use cis2_jose::{Alg, SigningKey};
use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use cis2_mock_idp::{Client, Options};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const RUNS: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let key = SigningKey::generate(Alg::RS512);
    let client: Client = serde_json::from_value(json!({
        "client_id": "bench.apps.national", "auth_method": "private_key_jwt",
        "jwks": {"keys": [key.public_jwk()]}, "redirect_uris": ["http://127.0.0.1/callback"],
    }))
    .unwrap();
    let provider = cis2_mock_idp::start(Options {
        clients: vec![client],
        ..Options::default()
    })
    .await
    .unwrap();
    let clock = Arc::new(SystemClock);
    let rp = RelyingParty {
        discovery: Discovery::new(
            provider.issuer.clone(),
            HttpClient::new(None, Duration::from_secs(10)).unwrap(),
            clock.clone(),
        ),
        settings: ClientSettings {
            client_id: "bench.apps.national".into(),
            exchange: Exchange::Direct(ClientAuth::PrivateKeyJwt(Box::new(key))),
            scopes: [
                "openid",
                "profile",
                "email",
                "nationalrbacaccess",
                "associatedorgs",
                "selectedrole",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            acr_values: Some("AAL3_ANY".into()),
            prompt: Some("login".into()),
            max_age: Some(300),
            redirect_ports: vec![],
            login_timeout: Duration::from_secs(30),
        },
        clock,
    };
    let browser = Browser::Callback(Arc::new(|url: &str| {
        let url = url.to_string();
        tokio::spawn(async move {
            let _ = ScriptedBrowser::default()
                .sign_in(&url, &Script::new("555021935108", "smartcard"))
                .await;
        });
    }));
    let mut agent_ms = Vec::with_capacity(RUNS);
    let mut provider_ms = Vec::with_capacity(RUNS);
    for i in 0..RUNS + 10 {
        let signed_in = rp.sign_in(&browser, None, &[], &[]).await.expect("sign-in");
        let total = signed_in.callback_to_done.expect("timed");
        if i >= 10 {
            // The first few warm caches (discovery, JWKS, connections) and are not counted.
            agent_ms.push(total.saturating_sub(signed_in.provider_time).as_secs_f64() * 1000.0);
            provider_ms.push(signed_in.provider_time.as_secs_f64() * 1000.0);
        }
    }
    agent_ms.sort_by(f64::total_cmp);
    provider_ms.sort_by(f64::total_cmp);
    println!(
        "sign-in overhead inside the agent (callback received -> signed in, provider time excluded)"
    );
    println!(
        "runs: {RUNS} (after 10 warm-up), private_key_jwt RS512, ID token RS256, provider on loopback"
    );
    println!(
        "agent:    median {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        percentile(&agent_ms, 0.5),
        percentile(&agent_ms, 0.9),
        percentile(&agent_ms, 0.99),
        agent_ms[agent_ms.len() - 1]
    );
    println!(
        "provider: median {:.2} ms   p90 {:.2} ms (token + userinfo calls, excluded above)",
        percentile(&provider_ms, 0.5),
        percentile(&provider_ms, 0.9)
    );
    let target = 20.0;
    println!(
        "target: median <= {target} ms -> {}",
        if percentile(&agent_ms, 0.5) <= target {
            "met"
        } else {
            "NOT met"
        }
    );
}
