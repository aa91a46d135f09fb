//! The agent with `method = "relay"`, in process: the sandbox provider, a real `cis2-relay`, and in front of
//! it a proxy that can lie — so the agent's own checks of the relay's answer are seen to hold: the nonce
//! only the agent knows, and the relay's `sub` against the ID token's.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use cis2_core::agent::{Agent, AgentError, AgentOptions, Timers, TokenRequest};
use cis2_core::browser::Browser;
use cis2_core::clock::TestClock;
use cis2_core::config;
use cis2_jose::{Alg, SigningKey};
use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use cis2_mock_idp::{Client, Options, RunningProvider};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENT_ID: &str = "relayed.apps.national";
const BEN: &str = "555021935108";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lie {
    None,
    /// Answers with the ID token of an earlier sign-in (another nonce).
    OldIdToken,
    /// Says the tokens are someone else's.
    OtherSub,
}

#[derive(Clone)]
struct Proxy {
    relay: String,
    lie: Arc<Mutex<Lie>>,
    kept_id_token: Arc<Mutex<Option<Value>>>,
    http: reqwest::Client,
}

impl Proxy {
    /// POSTs the JSON `body` to the real relay's `path`.
    async fn to_relay(&self, path: &str, body: Bytes) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.relay))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

async fn pass_on_revoke(State(proxy): State<Proxy>, body: Bytes) -> axum::response::Response {
    let response = proxy.to_relay("v1/revoke", body).await;
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let body = response.bytes().await.unwrap();
    (status, [("content-type", "application/json")], body).into_response()
}

async fn forward(State(proxy): State<Proxy>, body: Bytes) -> axum::response::Response {
    let response = proxy.to_relay("v1/token", body).await;
    let status = response.status().as_u16();
    let mut answer: Value = response.json().await.unwrap();
    if status == 200 {
        let lie = *proxy.lie.lock().unwrap();
        let mut kept = proxy.kept_id_token.lock().unwrap();
        match lie {
            Lie::None => {}
            Lie::OldIdToken => {
                if let Some(old) = kept.clone() {
                    answer["id_token"] = old;
                }
            }
            Lie::OtherSub => {
                answer["sub"] = json!("555021935107");
                answer["user"]["uid"] = json!("555021935107");
            }
        }
        if kept.is_none() {
            *kept = Some(answer["id_token"].clone());
        }
    }
    (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response()
}

/// An agent with the config `text` whose browser signs Ben in with his smartcard.
async fn agent_for_ben(text: &str, dir: &std::path::Path, clock: TestClock) -> Agent {
    let config = config::parse(text, &dir.join("config.toml")).unwrap();
    let browser = Browser::Callback(Arc::new(move |url: &str| {
        let url = url.to_string();
        tokio::spawn(async move {
            let _ = ScriptedBrowser::default()
                .sign_in(&url, &Script::new(BEN, "smartcard"))
                .await;
        });
    }));
    Agent::start(AgentOptions {
        config,
        browser,
        clock: Arc::new(clock),
        approver: None,
        store: None,
        timers: Timers::default(),
    })
    .await
    .unwrap()
}

struct Setup {
    provider: RunningProvider,
    _relay: cis2_relay::RunningRelay,
    lie: Arc<Mutex<Lie>>,
    agent: Agent,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let provider = cis2_mock_idp::start(Options::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("relay-key.pem"),
        SigningKey::generate(Alg::RS512).to_pkcs8_pem(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n[signing]\nkeys = [\"relay-key.pem\"]\n",
            provider.issuer
        ),
    )
    .unwrap();
    let relay =
        cis2_relay::start(cis2_relay::config::load(&dir.path().join("relay.toml")).unwrap())
            .await
            .unwrap();
    let client: Client = serde_json::from_value(json!({
        "client_id": CLIENT_ID,
        "auth_method": "private_key_jwt",
        "jwks_uri": format!("{}.well-known/jwks.json", relay.url),
        "redirect_uris": ["http://127.0.0.1/callback"],
        "id_token_signed_response_alg": "RS512",
        "refresh_tokens": true,
    }))
    .unwrap();
    provider.provider.register_client(client).unwrap();

    let lie = Arc::new(Mutex::new(Lie::None));
    let proxy = Proxy {
        relay: relay.url.clone(),
        lie: lie.clone(),
        kept_id_token: Arc::new(Mutex::new(None)),
        http: reqwest::Client::new(),
    };
    let app = axum::Router::new()
        .route("/v1/token", axum::routing::post(forward))
        .route("/v1/revoke", axum::routing::post(pass_on_revoke))
        .with_state(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let text = format!(
        "environment = \"custom\"\n[provider]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nprompt = \"login\"\n\
         [provider.exchange]\nmethod = \"relay\"\nrelay_url = \"{proxy_url}\"\n\
         [agent]\ndata_dir = \"{}\"\nstore = \"memory\"\nclient_policy = \"allow\"\n\
         [session]\nend_session_at_provider = false\n",
        provider.issuer,
        dir.path().join("data").display(),
    );
    let agent = agent_for_ben(&text, dir.path(), TestClock::default()).await;
    Setup {
        provider,
        _relay: relay,
        lie,
        agent,
        _dir: dir,
    }
}

async fn login_error(setup: &Setup) -> String {
    match setup.agent.login(Some(Duration::from_secs(20))).await {
        Ok(status) => panic!("the sign-in should have been refused, got {status:?}"),
        Err(error @ AgentError::SignInFailed(_)) => error.to_string(),
        Err(other) => panic!("expected a refused sign-in, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_relay_signs_in_and_a_lying_one_is_caught_by_the_agent() {
    let setup = setup().await;
    let status = setup
        .agent
        .login(Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(status.user.as_ref().unwrap().uid, BEN);
    assert!(setup.agent.token(TokenRequest::default()).await.is_ok());
    assert_eq!(setup.provider.provider.live_refresh_tokens(BEN), 1);
    setup.agent.logout().await.unwrap();
    // Sign-out revokes the refresh token at CIS2, through the relay, which holds the credentials
    // (the provider session is left alone here: ending it would end the token too).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while setup.provider.provider.live_refresh_tokens(BEN) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh token is still live at the provider 10 s after sign-out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A replayed ID token (an earlier sign-in's) fails the nonce the relay never saw.
    *setup.lie.lock().unwrap() = Lie::OldIdToken;
    let message = login_error(&setup).await;
    assert!(message.contains("nonce"), "{message}");
    assert!(setup.agent.whoami().is_err(), "nobody is signed in");

    // Tokens said to be another person's than the ID token's are refused.
    *setup.lie.lock().unwrap() = Lie::OtherSub;
    let message = login_error(&setup).await;
    assert!(message.contains("another person"), "{message}");
    assert!(setup.agent.whoami().is_err());

    // Honest again: a sign-in works.
    *setup.lie.lock().unwrap() = Lie::None;
    assert!(
        setup
            .agent
            .login(Some(Duration::from_secs(20)))
            .await
            .is_ok()
    );
}

/// The relay's count of successful `/v1/exchange` calls, from its metrics.
async fn exchanges(relay_url: &str) -> u64 {
    let metrics = reqwest::get(format!("{relay_url}metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("cis2_relay_requests_total{endpoint=\"exchange\",status=\"200\"} ")
        })
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A sandbox provider that is also the API Platform, a real relay with an `apim` registration, and an
/// agent on an injected clock that serves the `apim` audience through it.
struct ApiPlatformWorld {
    _provider: RunningProvider,
    relay: cis2_relay::RunningRelay,
    agent: Agent,
    clock: TestClock,
    _dir: tempfile::TempDir,
}

fn apim() -> TokenRequest {
    TokenRequest {
        audience: Some("apim".into()),
        ..TokenRequest::default()
    }
}

async fn api_platform_world() -> ApiPlatformWorld {
    const API_KEY: &str = "apim-app-key-1";
    let provider = cis2_mock_idp::start(Options::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let apim = SigningKey::generate(Alg::RS512);
    std::fs::write(dir.path().join("apim.pem"), apim.to_pkcs8_pem()).unwrap();
    std::fs::write(
        dir.path().join("relay-key.pem"),
        SigningKey::generate(Alg::RS512).to_pkcs8_pem(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("relay.toml"),
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n[signing]\nkeys = [\"relay-key.pem\"]\n\
             [[api_platform]]\naudience = \"apim\"\ntoken_url = \"{}\"\napi_key = \"{API_KEY}\"\n\
             key = \"apim.pem\"\nkid = \"int-1\"\n",
            provider.issuer,
            provider.provider.api_token_endpoint(),
        ),
    )
    .unwrap();
    let relay =
        cis2_relay::start(cis2_relay::config::load(&dir.path().join("relay.toml")).unwrap())
            .await
            .unwrap();
    for client in [
        json!({
            "client_id": CLIENT_ID,
            "auth_method": "private_key_jwt",
            "jwks_uri": format!("{}.well-known/jwks.json", relay.url),
            "redirect_uris": ["http://127.0.0.1/callback"],
            "id_token_signed_response_alg": "RS512",
            "refresh_tokens": true,
        }),
        json!({
            "client_id": API_KEY,
            "auth_method": "private_key_jwt",
            "jwks": {"keys": [apim.with_kid("int-1").unwrap().public_jwk()]},
            "redirect_uris": ["https://ehr.example/unused"],
        }),
    ] {
        let client: Client = serde_json::from_value(client).unwrap();
        provider.provider.register_client(client).unwrap();
    }
    let text = format!(
        "environment = \"custom\"\n[provider]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n\
         [provider.exchange]\nmethod = \"relay\"\nrelay_url = \"{}\"\n\
         [[provider.audiences]]\nname = \"apim\"\n\
         [agent]\ndata_dir = \"{}\"\nstore = \"memory\"\nclient_policy = \"allow\"\n\
         [session]\nend_session_at_provider = false\ninactivity_action = \"none\"\n",
        provider.issuer,
        relay.url,
        dir.path().join("data").display(),
    );
    let clock = TestClock::default();
    let agent = agent_for_ben(&text, dir.path(), clock.clone()).await;
    agent.login(Some(Duration::from_secs(20))).await.unwrap();
    ApiPlatformWorld {
        _provider: provider,
        relay,
        agent,
        clock,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_platform_token_in_use_is_renewed_in_the_background_before_it_expires() {
    let world = api_platform_world().await;
    let (relay, agent, clock) = (&world.relay, &world.agent, &world.clock);
    let first = agent.token(apim()).await.unwrap();
    assert_eq!(first.lifetime_secs, Some(3600));
    assert_eq!(exchanges(&relay.url).await, 1);

    // Inside the renewal margin (60 s; when it starts is the unit tests' to pin down), the lifecycle
    // tick exchanges again with no program asking…
    clock.advance(3600 - 30);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while exchanges(&relay.url).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background renewal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // …so the next call is answered the new token from the cache, without an exchange of its own.
    let renewed = agent.token(apim()).await.unwrap();
    assert_ne!(renewed.access_token, first.access_token);
    assert!(renewed.expires_at > first.expires_at);
    assert_eq!(exchanges(&relay.url).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smartcard_lock_drops_the_api_platform_token_as_any_lock_does() {
    use cis2_core::smartcard::Card;
    let card = Card::Known("ab".repeat(16));
    let world = api_platform_world().await;
    let agent = &world.agent;
    // Sign in again with the card in the reader, so the session is bound to it.
    agent.card_inserted(card.clone()).await;
    agent.logout().await.unwrap();
    agent.login(Some(Duration::from_secs(20))).await.unwrap();
    let before = agent.token(apim()).await.unwrap();
    let exchanged = exchanges(&world.relay.url).await;

    agent.card_removed(card.clone()).await;
    assert!(matches!(
        agent.token(apim()).await,
        Err(AgentError::Locked {
            card_unlocks: true,
            ..
        })
    ));
    // The same card back unlocks without a sign-in; the API token held before the lock is gone, so
    // the next call exchanges again rather than answering it.
    agent.card_inserted(card).await;
    let after = agent.token(apim()).await.unwrap();
    assert_ne!(after.access_token, before.access_token);
    assert_eq!(exchanges(&world.relay.url).await, exchanged + 1);
}

/// An audience the config does not route is refused as a bad request (-32602) that names the
/// audiences the agent does serve, as a variant a program can match and pick from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_audience_is_refused_with_the_audiences_served() {
    let world = api_platform_world().await;
    let error = world
        .agent
        .token(TokenRequest {
            audience: Some("pds".into()),
            ..TokenRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), -32602);
    assert_eq!(
        error.to_string(),
        "No audience \"pds\" is configured; this agent serves apim."
    );
    let AgentError::UnknownAudience { asked, served } = error else {
        panic!("{error:?}");
    };
    assert_eq!((asked.as_str(), served), ("pds", vec!["apim".to_string()]));
    assert_eq!(exchanges(&world.relay.url).await, 0);
}
