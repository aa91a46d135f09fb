//! The relying party in process against the sandbox provider over real HTTP on loopback, with a
//! scripted browser that follows the redirect into the agent's loopback listener, per-test provider
//! expectations (the OpenID Foundation's RP certification cases), and an injected clock.

use cis2_core::agent::{
    Agent, AgentError, AgentOptions, Event, SessionState, Timers, TokenRequest,
};
use cis2_core::browser::Browser;
use cis2_core::clock::{Clock, TestClock};
use cis2_core::config;
use cis2_core::smartcard::Card;
use cis2_jose::{Alg, JwkSet, SigningKey};
use cis2_mock_idp::browser::{Outcome, Script, ScriptedBrowser};
use cis2_mock_idp::{Client, ClientAuthMethod, Lifetimes, Options, RunningProvider};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const CLIENT_ID: &str = "rp.apps.national";
const AMELIA: &str = "555021935107";
const BEN: &str = "555021935108";
const CHRIS: &str = "555021935109";

fn client_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate(Alg::RS512))
}

struct Harness {
    provider: RunningProvider,
    agent: Agent,
    clock: HarnessClock,
    script: Arc<Mutex<Script>>,
    opened: Arc<AtomicUsize>,
    outcomes: Arc<Mutex<Vec<Result<Outcome, String>>>>,
    _dir: tempfile::TempDir,
}

/// The agent's clock in a harness: the wall clock plus what the test advanced, or, for a driven agent,
/// the time at the start plus what the test advanced (a second of the wall clock passing in between
/// would make a driven test's "the same second" a different one).
#[derive(Clone)]
struct HarnessClock {
    wall: TestClock,
    frozen: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl HarnessClock {
    fn new(frozen: bool) -> HarnessClock {
        let wall = TestClock::default();
        let frozen = frozen.then(|| Arc::new(std::sync::atomic::AtomicU64::new(Clock::now(&wall))));
        HarnessClock { wall, frozen }
    }

    fn advance(&self, secs: i64) {
        self.wall.advance(secs);
        if let Some(frozen) = &self.frozen {
            let now = frozen.load(Ordering::SeqCst).saturating_add_signed(secs);
            frozen.store(now, Ordering::SeqCst);
        }
    }
}

impl Clock for HarnessClock {
    fn now(&self) -> u64 {
        match &self.frozen {
            Some(frozen) => frozen.load(Ordering::SeqCst),
            None => self.wall.now(),
        }
    }
}

struct Setup {
    acr_values: &'static str,
    lifetimes: Lifetimes,
    refresh_tokens: bool,
    store: Option<Arc<dyn cis2_core::store::TokenStore>>,
    session_toml: &'static str,
    /// The agent runs no timers of its own and its clock moves only with `advance`: the test calls
    /// `tick` (see the lifecycle tests at the end).
    driven: bool,
}

impl Setup {
    /// The defaults, with access tokens that live `secs`.
    fn tokens_lasting(secs: u64) -> Setup {
        Setup {
            lifetimes: Lifetimes {
                access_token: secs,
                ..Lifetimes::default()
            },
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            acr_values: "AAL2_OR_AAL3_ANY",
            lifetimes: Lifetimes::default(),
            refresh_tokens: true,
            store: None,
            session_toml: "",
            driven: false,
        }
    }
}

async fn harness(setup: Setup) -> Harness {
    let client: Client = serde_json::from_value(json!({
        "client_id": CLIENT_ID,
        "auth_method": ClientAuthMethod::PrivateKeyJwt,
        "jwks": {"keys": [client_key().public_jwk()]},
        "redirect_uris": ["http://127.0.0.1/callback"],
        "refresh_tokens": setup.refresh_tokens,
        "rotate_refresh_tokens": true,
    }))
    .unwrap();
    let provider = cis2_mock_idp::start(Options {
        clients: vec![client],
        lifetimes: setup.lifetimes,
        ..Options::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("client-key.pem");
    std::fs::write(&key_path, client_key().to_pkcs8_pem()).unwrap();
    let text = format!(
        "environment = \"custom\"\n[provider]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nacr_values = \"{}\"\n\
         [provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"{}\"\nalg = \"RS512\"\n\
         [agent]\ndata_dir = \"{}\"\nstore = \"memory\"\n{}",
        provider.issuer,
        setup.acr_values,
        key_path.display(),
        dir.path().join("data").display(),
        setup.session_toml,
    );
    let config = config::parse(&text, &dir.path().join("config.toml")).unwrap();
    let script = Arc::new(Mutex::new(Script::new(BEN, "smartcard")));
    let opened = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let browser = {
        let (script, opened, outcomes) = (script.clone(), opened.clone(), outcomes.clone());
        Browser::Callback(Arc::new(move |url: &str| {
            opened.fetch_add(1, Ordering::SeqCst);
            let (url, script, outcomes) = (
                url.to_string(),
                script.lock().unwrap().clone(),
                outcomes.clone(),
            );
            tokio::spawn(async move {
                let outcome = ScriptedBrowser::default().sign_in(&url, &script).await;
                outcomes.lock().unwrap().push(outcome);
            });
        }))
    };
    let clock = HarnessClock::new(setup.driven);
    let agent = Agent::start(AgentOptions {
        config,
        browser,
        clock: Arc::new(clock.clone()),
        approver: None,
        store: setup.store.clone(),
        timers: if setup.driven {
            Timers::Driven
        } else {
            Timers::EveryQuarterSecond
        },
    })
    .await
    .unwrap();
    Harness {
        provider,
        agent,
        clock,
        script,
        opened,
        outcomes,
        _dir: dir,
    }
}

impl Harness {
    /// Starts a sign-in whose browser stops before the final redirect; that redirect, once there.
    async fn login_held_at_the_callback(
        &self,
    ) -> (
        tokio::task::JoinHandle<Result<cis2_core::agent::Status, cis2_core::agent::AgentError>>,
        Outcome,
    ) {
        self.script.lock().unwrap().follow_callback = false;
        let agent = self.agent.clone();
        let login = tokio::spawn(async move { agent.login(Some(Duration::from_secs(20))).await });
        loop {
            if let Some(outcome) = self.outcomes.lock().unwrap().first().cloned() {
                return (login, outcome.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Time passes for everyone: the agent's injected clock and the provider's.
    fn advance(&self, secs: i64) {
        self.clock.advance(secs);
        self.provider.provider.advance_clock(secs);
    }

    fn expect_next_token(&self, expectation: Value) {
        self.provider
            .provider
            .expect_next_token(serde_json::from_value(expectation).unwrap());
    }

    async fn login(&self) -> Result<cis2_core::agent::Status, AgentError> {
        self.agent.login(Some(Duration::from_secs(20))).await
    }

    async fn login_error(&self) -> String {
        match self.login().await {
            Ok(status) => panic!("the sign-in should have been refused, got {status:?}"),
            Err(error @ AgentError::SignInFailed(_)) => error.to_string(),
            Err(other) => panic!("expected -32002, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_full_sign_in_with_private_key_jwt_gives_the_user_and_role() {
    let h = harness(Setup::default()).await;
    let mut events = h.agent.subscribe();
    h.script.lock().unwrap().role = Some("555021935107002".into());
    h.script.lock().unwrap().uid = AMELIA.into();
    let status = h.login().await.unwrap();
    assert_eq!(status.state, SessionState::SignedIn);
    assert_eq!(status.environment, "custom");
    let user = status.user.unwrap();
    assert_eq!(user.uid, AMELIA);
    assert_eq!(user.roles.len(), 3);
    let role = user.selected_role.unwrap();
    assert_eq!(role.id, "555021935107002");
    assert_eq!(
        role.org_name.as_deref(),
        Some("Riverside Teaching Hospitals NHS Foundation Trust")
    );
    assert_eq!(user.assurance.amr, vec!["N3_SMARTCARD"]);
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedIn { .. }
    ));
    let outcome = h.outcomes.lock().unwrap()[0].clone().unwrap();
    assert_eq!(outcome.callback_status, Some(200));
    assert!(
        outcome
            .callback_body
            .unwrap()
            .contains("You can close this tab")
    );
    let token = h.agent.token(TokenRequest::default()).await.unwrap();
    assert_eq!(token.token_type, "Bearer");
    assert!(!token.access_token.is_empty());
}

#[tokio::test]
async fn a_user_with_no_roles_is_signed_in() {
    let h = harness(Setup::default()).await;
    h.script.lock().unwrap().uid = CHRIS.into();
    let user = h.login().await.unwrap().user.unwrap();
    assert!(user.roles.is_empty());
    assert!(user.selected_role.is_none());
}

#[tokio::test]
async fn each_id_token_rule_refuses_with_its_own_reason() {
    let h = harness(Setup {
        acr_values: "AAL3_ANY",
        ..Setup::default()
    })
    .await;
    let issuer = h.provider.issuer.clone();
    let port = h.provider.addr.port();
    let now = Clock::now(&h.clock);
    let cases = vec![
        ("alg none", json!({"signing": "none"}), "unsigned"),
        (
            "bad signature",
            json!({"signing": "bad_signature"}),
            "signature did not verify",
        ),
        (
            "unknown key",
            json!({"signing": "unknown_key"}),
            "which the provider does not publish",
        ),
        (
            "HS256 with the client secret",
            json!({"signing": "hs256_client_secret"}),
            "HS256",
        ),
        (
            "wrong iss",
            json!({"id_token_claims": {"iss": "https://evil.example/openam"}}),
            "not by the configured issuer",
        ),
        (
            "another provider's token, signed by a key this provider does not publish",
            json!({"signing": "unknown_key", "id_token_claims": {"iss": "https://evil.example/openam"}}),
            "not by the configured issuer",
        ),
        (
            "iss differing only by the port",
            json!({"id_token_claims": {"iss": issuer.replace(&format!(":{port}"), "")}}),
            "not by the configured issuer",
        ),
        (
            "wrong aud",
            json!({"id_token_claims": {"aud": "someone.apps.national"}}),
            "not for this application",
        ),
        (
            "untrusted extra aud without azp",
            json!({"id_token_claims": {"aud": [CLIENT_ID, "other.apps.national"]}, "id_token_remove": ["azp"]}),
            "no azp",
        ),
        (
            "expired",
            json!({"id_token_claims": {"exp": now - 120}}),
            "has expired",
        ),
        (
            "iat in the future",
            json!({"id_token_claims": {"iat": now + 600}}),
            "in the future",
        ),
        (
            "nonce missing",
            json!({"id_token_remove": ["nonce"]}),
            "no nonce claim",
        ),
        (
            "nonce wrong",
            json!({"id_token_claims": {"nonce": "not-the-nonce"}}),
            "nonce does not match",
        ),
        (
            "auth_time too old",
            json!({"id_token_claims": {"auth_time": now - 3600}}),
            "older than max_age",
        ),
        (
            "acr too weak",
            json!({"id_token_claims": {"acr": "AAL2_ANY"}}),
            "weaker than",
        ),
        (
            "userinfo sub mismatch",
            json!({"userinfo_claims": {"sub": "999999999999"}}),
            "another person",
        ),
    ];
    for (case, expectation, reason) in cases {
        h.expect_next_token(expectation);
        let message = h.login_error().await;
        assert!(message.contains(reason), "{case}: {message}");
        assert_eq!(h.agent.status().state, SessionState::SignedOut, "{case}");
    }
    // And with nothing spoiled, the same harness signs in: the failures were the tokens' fault.
    h.login().await.unwrap();
}

#[tokio::test]
async fn kid_absent_is_accepted_with_one_key_and_refused_with_several() {
    let h = harness(Setup::default()).await;
    h.expect_next_token(json!({"signing": "no_kid"}));
    h.login().await.expect("one published key: no kid is fine");
    h.agent.logout().await.unwrap();
    h.provider.provider.add_next_key();
    // The agent still holds the one-key JWKS; the unknown-kid refetch does not apply without a kid,
    // so let the cache age out (an hour) on the injected clock.
    h.advance(3601);
    h.expect_next_token(json!({"signing": "no_kid"}));
    let message = h.login_error().await;
    assert!(
        message.contains("names no key and the provider publishes several"),
        "{message}"
    );
}

#[tokio::test]
async fn key_rotation_is_followed_without_a_failed_sign_in() {
    let h = harness(Setup::default()).await;
    h.login().await.unwrap();
    h.agent.logout().await.unwrap();
    h.provider.provider.add_next_key();
    h.provider.provider.activate_next_key().unwrap();
    h.provider.provider.retire_previous_keys();
    h.login()
        .await
        .expect("the new kid makes the agent fetch the JWKS again");
}

#[tokio::test]
async fn cancelling_in_the_browser_is_explained() {
    let h = harness(Setup::default()).await;
    h.script.lock().unwrap().cancel = true;
    let message = h.login_error().await;
    assert!(message.contains("cancelled or refused"), "{message}");
    assert!(message.contains("access_denied"), "{message}");
}

#[tokio::test]
async fn a_second_callback_after_the_first_finds_the_listener_closed() {
    let h = harness(Setup::default()).await;
    h.login().await.unwrap();
    let outcome = h.outcomes.lock().unwrap()[0].clone().unwrap();
    let replay = reqwest::Client::new().get(&outcome.redirect).send().await;
    assert!(
        replay.is_err(),
        "the loopback listener must be closed after one callback"
    );
}

#[tokio::test]
async fn a_callback_with_the_wrong_state_is_ignored_and_the_real_one_taken() {
    let h = harness(Setup::default()).await;
    let (login, outcome) = h.login_held_at_the_callback().await;
    let forged = outcome.redirect.replace(
        &format!("state={}", outcome.param("state").unwrap()),
        "state=forged",
    );
    let cookies = outcome.redirect_cookies.clone().unwrap();
    let as_the_browser = |url: &str| {
        reqwest::Client::new()
            .get(url)
            .header(reqwest::header::COOKIE, cookies.clone())
            .send()
    };
    let answer = as_the_browser(&forged).await.unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    assert_eq!(
        as_the_browser(&outcome.redirect)
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(login.await.unwrap().unwrap().state, SessionState::SignedIn);
}

#[tokio::test]
async fn the_right_callback_from_another_browser_ends_the_sign_in_and_signs_in_nobody() {
    // Login CSRF: someone who learned the state (another user of the computer) delivers a code
    // without the cookie the start URL gave the real browser. It fails closed.
    let h = harness(Setup::default()).await;
    let (login, outcome) = h.login_held_at_the_callback().await;
    assert!(
        outcome.redirect_cookies.is_some(),
        "the start URL set its cookie"
    );
    let answer = reqwest::get(&outcome.redirect).await.unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    let error = login.await.unwrap().unwrap_err().to_string();
    assert!(
        error.contains("did not come from the browser that started"),
        "{error}"
    );
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    assert!(h.agent.whoami().is_err());
}

#[tokio::test]
async fn twenty_concurrent_logins_open_one_browser() {
    let h = harness(Setup::default()).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let agent = h.agent.clone();
        calls.push(tokio::spawn(async move {
            agent.login(Some(Duration::from_secs(20))).await
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().state, SessionState::SignedIn);
    }
    assert_eq!(h.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_token_is_refreshed_inside_the_margin_once_for_many_callers() {
    let h = harness(Setup {
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    let first = h.agent.token(TokenRequest::default()).await.unwrap();
    let mut events = h.agent.subscribe();
    // Step to 30 s before expiry: inside the 60 s refresh margin.
    h.advance(270);
    let mut calls = Vec::new();
    for _ in 0..100 {
        let agent = h.agent.clone();
        calls.push(tokio::spawn(async move {
            agent.token(TokenRequest::default()).await
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        // With rotating refresh tokens a second refresh would use a dead token and end the session:
        // every call succeeding with one new token shows the refresh happened once.
        tokens.insert(call.await.unwrap().unwrap().access_token);
    }
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains(&first.access_token));
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::TokenRefreshed { .. }
    ));
    assert!(events.try_recv().is_err(), "exactly one refresh");
}

#[tokio::test]
async fn without_a_refresh_token_an_expired_session_asks_for_sign_in() {
    let h = harness(Setup {
        refresh_tokens: false,
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    assert!(
        h.agent
            .token(TokenRequest {
                min_valid_secs: Some(100),
                ..Default::default()
            })
            .await
            .is_ok()
    );
    h.advance(301);
    let err = h.agent.token(TokenRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), -32001, "{err}");
}

#[tokio::test]
async fn a_provider_outage_keeps_the_session_and_says_why() {
    let h = harness(Setup {
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    let cached = h.agent.token(TokenRequest::default()).await.unwrap();
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "error500"})).unwrap(),
    );
    h.advance(270);
    // Still valid for 30 s: served from the cache although the refresh failed.
    let served = h.agent.token(TokenRequest::default()).await.unwrap();
    assert_eq!(served.access_token, cached.access_token);
    // A client that needs more than is left gets -32005 with the reason, and the session stays.
    let err = h
        .agent
        .token(TokenRequest {
            min_valid_secs: Some(120),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), -32005, "{err}");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    h.provider
        .provider
        .set_fault(serde_json::from_value(json!({"endpoint": "token", "mode": "none"})).unwrap());
    // The agent backs off after failures (1 s doubling, with jitter): step past it.
    h.advance(5);
    let renewed = h
        .agent
        .token(TokenRequest {
            min_valid_secs: Some(120),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_ne!(renewed.access_token, cached.access_token);
}

#[tokio::test]
async fn a_provider_that_is_down_at_sign_in_is_minus_32005() {
    let h = harness(Setup::default()).await;
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "malformed", "count": 1}))
            .unwrap(),
    );
    let err = h.login().await.unwrap_err();
    assert_eq!(err.code(), -32005, "{err}");
    assert!(err.to_string().contains("not the expected JSON"), "{err}");
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
}

#[tokio::test]
async fn revoked_grants_end_the_session_on_refresh() {
    let h = harness(Setup {
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    h.provider.provider.revoke_user(BEN).unwrap();
    h.advance(280);
    let err = h.agent.token(TokenRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), -32001, "{err}");
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedIn { .. }
    ));
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedOut { .. }
    ));
}

#[tokio::test]
async fn logout_ends_the_session_here_and_at_the_provider() {
    let h = harness(Setup::default()).await;
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    h.agent.logout().await.unwrap();
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    assert_eq!(h.agent.whoami().unwrap_err().code(), -32001);
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedIn { .. }
    ));
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedOut { .. }
    ));
    // The provider side runs in the background: revocation and end session land shortly.
    let mut live = usize::MAX;
    for _ in 0..300 {
        live = h.provider.provider.live_tokens(BEN);
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        live, 0,
        "logout revoked the refresh token and ended the provider session"
    );
}

#[tokio::test]
async fn the_jwks_cache_is_used_between_sign_ins() {
    let h = harness(Setup::default()).await;
    h.login().await.unwrap();
    h.agent.logout().await.unwrap();
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "jwks", "mode": "error500"})).unwrap(),
    );
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "discovery", "mode": "error500"})).unwrap(),
    );
    h.login()
        .await
        .expect("discovery and keys come from the cache");
    let jwks: JwkSet = h.provider.provider.jwks();
    assert_eq!(jwks.keys.len(), 1);
}

/// Waits (in real time) for the agent's lifecycle timer to act on a clock change.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..40 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_restart_restores_the_session_without_a_browser() {
    let credentials: Arc<keyring_core::CredentialStore> = keyring_core::mock::Store::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn cis2_core::store::TokenStore> =
        Arc::new(cis2_core::store::KeyringStore::open(data.path(), &credentials).unwrap());
    let h = harness(Setup {
        store: Some(store.clone()),
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    let before = h.agent.token(TokenRequest::default()).await.unwrap();
    let config = h.agent.config().clone();
    drop(h.agent);
    // A new agent over the same store: signed in, same token, no browser opened.
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    let again = Agent::start(AgentOptions {
        config,
        browser: Browser::Callback(Arc::new(move |_: &str| {
            counter.fetch_add(1, Ordering::SeqCst);
        })),
        clock: Arc::new(h.clock.clone()),
        approver: None,
        store: Some(Arc::new(
            cis2_core::store::KeyringStore::open(data.path(), &credentials).unwrap(),
        )),
        timers: Timers::default(),
    })
    .await
    .unwrap();
    assert_eq!(again.status().state, SessionState::SignedIn);
    assert_eq!(again.whoami().unwrap().uid, BEN);
    assert_eq!(
        again
            .token(TokenRequest::default())
            .await
            .unwrap()
            .access_token,
        before.access_token
    );
    assert_eq!(opened.load(Ordering::SeqCst), 0);
    again.logout().await.unwrap();
    assert!(store.load().is_none(), "logout empties the store");
}

#[tokio::test]
async fn without_refresh_tokens_the_end_is_announced_then_the_session_ends() {
    let h = harness(Setup {
        refresh_tokens: false,
        lifetimes: Lifetimes {
            access_token: 600,
            ..Lifetimes::default()
        },
        session_toml: "[session]\nexpiring_notice_secs = 120\n",
        ..Setup::default()
    })
    .await;
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedIn { .. }
    ));
    h.advance(490);
    let expiring = tokio::time::timeout(Duration::from_secs(3), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(expiring, Event::SessionExpiring { .. }),
        "{expiring:?}"
    );
    // cis2ctl login now re-authenticates the same clinician (the GUI's "continue" does the same).
    h.login().await.unwrap();
    assert_eq!(h.opened.load(Ordering::SeqCst), 2);
    let reauthenticated = tokio::time::timeout(Duration::from_secs(3), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reauthenticated, Event::SignedIn { .. }),
        "{reauthenticated:?}"
    );
    // Left alone, the new session also ends: announced first, then signed out.
    h.advance(700);
    let mut seen = Vec::new();
    while !matches!(seen.last(), Some(Event::SignedOut { .. })) {
        seen.push(
            tokio::time::timeout(Duration::from_secs(3), events.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        matches!(
            seen.as_slice(),
            [Event::SessionExpiring { .. }, Event::SignedOut { .. }]
        ),
        "{seen:?}"
    );
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
}

#[tokio::test]
async fn inactivity_locks_and_the_same_clinician_unlocks() {
    let h = harness(Setup {
        session_toml: "[session]\ninactivity_secs = 900\ninactivity_action = \"lock\"\n",
        ..Setup::default()
    })
    .await;
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    h.advance(901);
    assert!(eventually(|| h.agent.status().state == SessionState::Locked).await);
    assert!(
        h.agent
            .status()
            .locked_reason
            .unwrap()
            .contains("no program used the session")
    );
    assert_eq!(
        h.agent
            .token(TokenRequest::default())
            .await
            .unwrap_err()
            .code(),
        -32004
    );
    assert_eq!(h.agent.whoami().unwrap_err().code(), -32004);
    // Another clinician cannot unlock it.
    h.script.lock().unwrap().uid = AMELIA.into();
    let refused = h.login().await.unwrap_err();
    assert!(
        refused.to_string().contains("must sign out first"),
        "{refused}"
    );
    assert_eq!(h.agent.status().state, SessionState::Locked);
    h.script.lock().unwrap().uid = BEN.into();
    assert_eq!(h.login().await.unwrap().state, SessionState::SignedIn);
    let seen: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::SignedIn { .. },
                Event::Locked { .. },
                Event::Unlocked
            ]
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn the_absolute_limit_signs_out() {
    let h = harness(Setup {
        session_toml: "[session]\nabsolute_secs = 3600\ninactivity_action = \"none\"\n",
        lifetimes: Lifetimes {
            access_token: 7200,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    h.advance(3601);
    assert!(eventually(|| h.agent.status().state == SessionState::SignedOut).await);
}

#[tokio::test]
async fn refresh_happens_in_the_background_before_expiry() {
    let h = harness(Setup {
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::SignedIn { .. }
    ));
    h.advance(250);
    // No client asked: the agent renewed by itself inside the 60 s margin.
    let refreshed = tokio::time::timeout(Duration::from_secs(3), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(refreshed, Event::TokenRefreshed { .. }),
        "{refreshed:?}"
    );
}

/// CIS2's issuer spells `:443`. Served for real on port 443 of a loopback alias (CI runs as root), the
/// agent configured with `:443` signs in; configured without it, discovery is refused — the issuer is
/// compared as a string, never normalised through a URL type.
#[tokio::test]
async fn an_issuer_with_443_works_and_one_without_it_is_refused() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.44".to_string()]).unwrap();
    let Ok(provider) = cis2_mock_idp::start(Options {
        bind: "127.0.0.44".parse().unwrap(),
        port: 443,
        tls: Some(cis2_mock_idp::TlsPem {
            cert: cert.cert.pem(),
            key: cert.key_pair.serialize_pem(),
        }),
        ..Options::default()
    })
    .await
    else {
        eprintln!("cannot bind 127.0.0.44:443 here (not root); CI runs this as root");
        return;
    };
    let with_port = provider.issuer.clone();
    assert!(
        with_port.starts_with("https://127.0.0.44:443/openam/"),
        "{with_port}"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let agent_for = |issuer: &str| {
        let text = format!(
            "environment = \"custom\"\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"100000000001.apps.national\"\nca_file = \"{}\"\n\
             [provider.exchange]\nmethod = \"none\"\n[agent]\nstore = \"memory\"\ndata_dir = \"{}\"\n",
            ca.display(),
            dir.path().join("data").display()
        );
        let config = config::parse(&text, &dir.path().join("config.toml")).unwrap();
        Agent::start(AgentOptions {
            config,
            browser: Browser::Callback(Arc::new({
                let pem = cert.cert.pem();
                move |url: &str| {
                    let (url, pem) = (url.to_string(), pem.clone());
                    tokio::spawn(async move {
                        let _ = ScriptedBrowser::new(Some(&pem))
                            .sign_in(&url, &Script::new(BEN, "smartcard"))
                            .await;
                    });
                }
            })),
            clock: Arc::new(TestClock::default()),
            approver: None,
            store: None,
            timers: Timers::default(),
        })
    };
    let agent = agent_for(&with_port).await.unwrap();
    let status = agent.login(Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(status.state, SessionState::SignedIn);
    let without_port = with_port.replace(":443", "");
    let agent = agent_for(&without_port).await.unwrap();
    let err = agent
        .login(Some(Duration::from_secs(20)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must match exactly"), "{err}");
}

#[tokio::test]
async fn a_refresh_that_finishes_after_logout_does_not_bring_the_session_back() {
    let credentials: Arc<keyring_core::CredentialStore> = keyring_core::mock::Store::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn cis2_core::store::TokenStore> =
        Arc::new(cis2_core::store::KeyringStore::open(data.path(), &credentials).unwrap());
    let h = harness(Setup {
        store: Some(store.clone()),
        lifetimes: Lifetimes {
            access_token: 3600,
            ..Lifetimes::default()
        },
        // The provider session stays, so the late answer is a good one: only the agent can drop it.
        session_toml: "[session]\nend_session_at_provider = false\n",
        ..Setup::default()
    })
    .await;
    h.login().await.unwrap();
    // The provider answers the refresh, but slowly; the clinician signs out meanwhile.
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "delay", "delay_ms": 800}))
            .unwrap(),
    );
    let agent = h.agent.clone();
    let renewing = tokio::spawn(async move {
        agent
            .token(TokenRequest {
                min_valid_secs: Some(3600),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.agent.logout().await.unwrap();
    let answer = renewing.await.unwrap();
    assert_eq!(
        answer.unwrap_err().code(),
        -32001,
        "the late refresh is dropped"
    );
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    assert!(store.load().is_none(), "and not written back to the store");
}

fn card(serial: &str) -> Card {
    Card::Known(serial.into())
}

#[tokio::test]
async fn a_card_removal_locks_only_for_the_card_of_the_sign_in_and_the_same_card_unlocks() {
    let h = harness(Setup::default()).await;
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    // A card that is not the session's comes and goes: nothing happens.
    h.agent.card_removed(card("other")).await;
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    h.agent.card_removed(card("A")).await;
    let status = h.agent.status();
    assert_eq!(status.state, SessionState::Locked);
    assert_eq!(status.smartcard_present, Some(false));
    assert_eq!(h.agent.whoami().unwrap_err().code(), -32004);
    h.agent.card_inserted(card("A")).await;
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    assert!(h.agent.token(TokenRequest::default()).await.is_ok());
    assert_eq!(h.opened.load(Ordering::SeqCst), 1, "no new sign-in");
}

#[tokio::test]
async fn a_card_back_after_the_session_expired_does_not_unlock_it() {
    let h = harness(Setup {
        refresh_tokens: false,
        session_toml: "[session]\ninactivity_action = \"none\"\n",
        lifetimes: Lifetimes {
            access_token: 3600,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    h.agent.card_removed(card("A")).await;
    let mut events = h.agent.subscribe();
    h.advance(3601);
    h.agent.card_inserted(card("A")).await;
    assert_ne!(h.agent.status().state, SessionState::SignedIn);
    let seen: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(!seen.contains(&Event::Unlocked), "{seen:?}");
}

#[tokio::test]
async fn same_card_unlocks_off_keeps_the_lock_until_a_sign_in() {
    let h = harness(Setup {
        session_toml: "[workstation]\nsame_card_unlocks = false\n",
        ..Setup::default()
    })
    .await;
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    h.agent.card_removed(card("A")).await;
    h.agent.card_inserted(card("A")).await;
    assert_eq!(h.agent.status().state, SessionState::Locked);
    let message = h.agent.whoami().unwrap_err().to_string();
    assert!(!message.contains("smartcard back"), "{message}");
    assert_eq!(h.login().await.unwrap().state, SessionState::SignedIn);
}

#[tokio::test]
async fn on_card_removal_sign_out_ends_the_session_and_another_card_ends_a_locked_one() {
    let h = harness(Setup {
        session_toml: "[workstation]\non_card_removal = \"sign_out\"\n",
        ..Setup::default()
    })
    .await;
    let mut events = h.agent.subscribe();
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    h.agent.card_removed(card("A")).await;
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    let seen: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(
        matches!(seen.as_slice(), [Event::SignedIn { .. }, Event::SignedOut { reason }] if reason == "the smartcard was removed"),
        "{seen:?}"
    );

    let h = harness(Setup::default()).await;
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    h.agent.card_removed(card("A")).await;
    h.agent.card_inserted(card("B")).await;
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
}

#[tokio::test]
async fn a_card_that_cannot_be_identified_locks_but_never_unlocks() {
    let h = harness(Setup::default()).await;
    h.agent.card_inserted(Card::Unidentified).await;
    h.login().await.unwrap();
    h.agent.card_removed(Card::Unidentified).await;
    assert_eq!(h.agent.status().state, SessionState::Locked);
    h.agent.card_inserted(Card::Unidentified).await;
    assert_eq!(
        h.agent.status().state,
        SessionState::Locked,
        "it may be anyone's card"
    );
    h.agent.card_inserted(card("B")).await;
    assert_eq!(h.agent.status().state, SessionState::Locked);
}

#[tokio::test]
async fn a_session_signed_in_without_a_card_ignores_cards() {
    let h = harness(Setup::default()).await;
    h.login().await.unwrap();
    h.agent.card_inserted(card("A")).await;
    h.agent.card_removed(card("A")).await;
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
}

#[tokio::test]
async fn a_restart_keeps_a_lock_and_a_card_bound_session_waits_for_its_card() {
    let credentials: Arc<keyring_core::CredentialStore> = keyring_core::mock::Store::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let open_store = || -> Arc<dyn cis2_core::store::TokenStore> {
        Arc::new(cis2_core::store::KeyringStore::open(data.path(), &credentials).unwrap())
    };
    let h = harness(Setup {
        store: Some(open_store()),
        ..Setup::default()
    })
    .await;
    let restart = |config: cis2_core::config::Config| {
        Agent::start(AgentOptions {
            config,
            browser: Browser::Callback(Arc::new(|_: &str| {})),
            clock: Arc::new(h.clock.clone()),
            approver: None,
            store: Some(open_store()),
            timers: Timers::default(),
        })
    };
    // Locked, then restarted: still locked, for the same reason.
    h.login().await.unwrap();
    h.agent.lock("the workstation was locked");
    let config = h.agent.config().clone();
    let again = restart(config.clone()).await.unwrap();
    assert_eq!(again.status().state, SessionState::Locked);
    assert_eq!(
        again.status().locked_reason.as_deref(),
        Some("the workstation was locked")
    );
    assert_eq!(again.whoami().unwrap_err().code(), -32004);
    drop(again);

    // Signed in with a card: after a restart the session waits, locked, for that card.
    h.agent.logout().await.unwrap();
    h.agent.card_inserted(card("A")).await;
    h.login().await.unwrap();
    let again = restart(config.clone()).await.unwrap();
    assert_eq!(again.status().state, SessionState::Locked);
    again.card_inserted(card("A")).await;
    assert_eq!(
        again.status().state,
        SessionState::SignedIn,
        "the same card lets it go on"
    );
    drop(again);
    let again = restart(config).await.unwrap();
    assert_eq!(again.status().state, SessionState::Locked);
    again.card_inserted(card("B")).await;
    assert_eq!(
        again.status().state,
        SessionState::SignedOut,
        "another card ends it"
    );
    drop(again);
    let again = restart(h.agent.config().clone()).await.unwrap();
    assert_eq!(
        again.status().state,
        SessionState::SignedOut,
        "and it stays ended"
    );
}

/// Refreshes seen as `token_refreshed` events so far.
fn refreshes(events: &mut tokio::sync::broadcast::Receiver<Event>) -> usize {
    std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| matches!(e, Event::TokenRefreshed { .. }))
        .count()
}

/// 50 callers at once, each asking for `min_valid` seconds, while the provider's first refresh
/// answer is slowed so that they all queue behind it: exactly one refresh, one token for all.
async fn fifty_callers_one_refresh(access_token_lifetime: u64, advance: i64, min_valid: u64) {
    let h = harness(Setup::tokens_lasting(access_token_lifetime)).await;
    h.login().await.unwrap();
    let first = h.agent.token(TokenRequest::default()).await.unwrap();
    let mut events = h.agent.subscribe();
    h.advance(advance);
    h.provider.provider.set_fault(
        serde_json::from_value(
            json!({"endpoint": "token", "mode": "delay", "delay_ms": 300, "count": 1}),
        )
        .unwrap(),
    );
    let mut calls = Vec::new();
    for _ in 0..50 {
        let agent = h.agent.clone();
        calls.push(tokio::spawn(async move {
            agent
                .token(TokenRequest {
                    min_valid_secs: Some(min_valid),
                    ..Default::default()
                })
                .await
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        let answer = call.await.unwrap().unwrap();
        assert!(answer.expires_at > h.agent.now() + min_valid);
        tokens.insert(answer.access_token);
    }
    assert_eq!(tokens.len(), 1, "one token for every caller");
    assert!(!tokens.contains(&first.access_token));
    assert_eq!(refreshes(&mut events), 1, "exactly one refresh");
}

#[tokio::test]
async fn fifty_callers_share_one_refresh_when_tokens_live_shorter_than_the_margin() {
    // 30 s tokens, a 60 s margin: every token is inside the margin from the start. 25 s on, 5 s
    // are left and each caller wants 20.
    fifty_callers_one_refresh(30, 25, 20).await;
}

#[tokio::test]
async fn fifty_callers_share_one_refresh_when_tokens_live_longer_than_the_margin() {
    // 300 s tokens: 270 s on, 30 s are left and each caller wants 100.
    fifty_callers_one_refresh(300, 270, 100).await;
}

#[tokio::test]
async fn after_an_outage_a_client_reaches_the_provider_within_a_second_whatever_the_backoff() {
    let h = harness(Setup::tokens_lasting(600)).await;
    h.login().await.unwrap();
    // 100 s left: outside the margin (no background renewal), short of what the client asks.
    h.advance(500);
    let ask = || TokenRequest {
        min_valid_secs: Some(120),
        ..Default::default()
    };
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "error500"})).unwrap(),
    );
    // The provider answers 500 for 10 s while a client keeps asking: the backoff grows past 10 s.
    for _ in 0..10 {
        let err = h.agent.token(ask()).await.unwrap_err();
        assert_eq!(err.code(), -32005, "{err}");
        h.advance(1);
    }
    // Healthy again: the next request, within 2 s, gets a fresh token.
    h.provider
        .provider
        .set_fault(serde_json::from_value(json!({"endpoint": "token", "mode": "none"})).unwrap());
    h.advance(1);
    let renewed = h.agent.token(ask()).await.unwrap();
    assert!(renewed.expires_at > h.agent.now() + 120);

    // Within one second the provider is asked once, however many clients ask: the one 500 below
    // is spent on the first; had any other reached the provider, it would have succeeded.
    h.advance(500);
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "error500", "count": 1}))
            .unwrap(),
    );
    let mut calls = Vec::new();
    for _ in 0..20 {
        let agent = h.agent.clone();
        calls.push(tokio::spawn(async move { agent.token(ask()).await }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap_err().code(), -32005);
    }
    h.advance(1);
    assert!(h.agent.token(ask()).await.is_ok());
}

#[tokio::test]
async fn a_role_change_is_signing_in_and_a_login_meanwhile_joins_it() {
    let h = harness(Setup::default()).await;
    h.script.lock().unwrap().uid = AMELIA.into();
    h.login().await.unwrap();
    let before = h.agent.whoami().unwrap();
    let other_role = before
        .roles
        .iter()
        .find(|r| Some(&r.id) != before.selected_role.as_ref().map(|s| &s.id))
        .unwrap()
        .id
        .clone();
    h.script.lock().unwrap().role = Some(other_role.clone());
    // The provider's answer to the role change's code exchange is slow: the flight stays open.
    h.provider.provider.set_fault(
        serde_json::from_value(
            json!({"endpoint": "token", "mode": "delay", "delay_ms": 1500, "count": 1}),
        )
        .unwrap(),
    );
    let change = {
        let agent = h.agent.clone();
        tokio::spawn(async move { agent.change_role().await })
    };
    assert!(eventually(|| h.opened.load(Ordering::SeqCst) == 2).await);
    assert_eq!(h.agent.status().state, SessionState::SigningIn);
    // A login now waits for the role change rather than answering at once or opening a browser.
    let joined = h.login().await.unwrap();
    assert_eq!(joined.state, SessionState::SignedIn);
    assert_eq!(
        joined.user.unwrap().selected_role.map(|r| r.id),
        Some(other_role.clone())
    );
    let changed = change.await.unwrap().unwrap();
    assert_eq!(changed.selected_role.map(|r| r.id), Some(other_role));
    assert_eq!(h.opened.load(Ordering::SeqCst), 2, "one browser flow");
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
}

#[tokio::test]
async fn a_role_change_finishing_during_a_lock_unlocks_and_says_so() {
    let h = harness(Setup::default()).await;
    h.script.lock().unwrap().uid = AMELIA.into();
    h.login().await.unwrap();
    // The provider's answer to the role change's code exchange is slow: the lock lands meanwhile.
    h.provider.provider.set_fault(
        serde_json::from_value(
            json!({"endpoint": "token", "mode": "delay", "delay_ms": 1500, "count": 1}),
        )
        .unwrap(),
    );
    let mut events = h.agent.subscribe();
    let change = {
        let agent = h.agent.clone();
        tokio::spawn(async move { agent.change_role().await })
    };
    assert!(eventually(|| h.opened.load(Ordering::SeqCst) == 2).await);
    h.agent.lock("the workstation was locked");
    assert!(change.await.unwrap().is_ok());
    // The clinician authenticated again in the browser, which lifts the lock as a sign-in does —
    // and every client that was told `locked` is told `unlocked`.
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    let seen = drained(&mut events);
    let locked = seen.iter().position(|e| matches!(e, Event::Locked { .. }));
    let unlocked = seen.iter().position(|e| matches!(e, Event::Unlocked));
    assert!(
        matches!((locked, unlocked), (Some(l), Some(u)) if l < u),
        "locked, then unlocked: {seen:?}"
    );
}

fn drained(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

fn role_changes(seen: &[Event]) -> Vec<Option<String>> {
    seen.iter()
        .filter_map(|e| match e {
            Event::RoleChanged { user } => Some(user.selected_role.as_ref().map(|r| r.id.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn unlocking_with_another_role_says_role_changed_and_the_same_role_does_not() {
    let h = harness(Setup {
        session_toml: "[session]\ninactivity_secs = 900\ninactivity_action = \"lock\"\n",
        ..Setup::default()
    })
    .await;
    h.script.lock().unwrap().uid = AMELIA.into();
    h.script.lock().unwrap().role = Some("555021935107001".into());
    let mut events = h.agent.subscribe();
    h.login().await.unwrap();
    // Locked, then unlocked by the same clinician in the same role: no role_changed.
    h.advance(901);
    assert!(eventually(|| h.agent.status().state == SessionState::Locked).await);
    h.login().await.unwrap();
    let seen = drained(&mut events);
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::SignedIn { .. },
                Event::Locked { .. },
                Event::Unlocked
            ]
        ),
        "{seen:?}"
    );
    // Locked again, and unlocked in another role: an EHR showing the old role must hear of it.
    h.advance(901);
    assert!(eventually(|| h.agent.status().state == SessionState::Locked).await);
    h.script.lock().unwrap().role = Some("555021935107003".into());
    h.login().await.unwrap();
    let seen = drained(&mut events);
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::Locked { .. },
                Event::Unlocked,
                Event::RoleChanged { .. }
            ]
        ),
        "{seen:?}"
    );
    assert_eq!(role_changes(&seen), vec![Some("555021935107003".into())]);
    assert_eq!(
        h.agent.whoami().unwrap().selected_role.map(|r| r.id),
        Some("555021935107003".into())
    );
}

#[tokio::test]
async fn a_role_change_that_picks_the_same_role_says_nothing() {
    let h = harness(Setup::default()).await;
    h.script.lock().unwrap().uid = AMELIA.into();
    h.script.lock().unwrap().role = Some("555021935107002".into());
    h.login().await.unwrap();
    let mut events = h.agent.subscribe();
    let same = h.agent.change_role().await.unwrap();
    assert_eq!(
        same.selected_role.map(|r| r.id),
        Some("555021935107002".into())
    );
    assert_eq!(
        role_changes(&drained(&mut events)),
        Vec::<Option<String>>::new()
    );
    h.script.lock().unwrap().role = Some("555021935107001".into());
    h.agent.change_role().await.unwrap();
    assert_eq!(
        role_changes(&drained(&mut events)),
        vec![Some("555021935107001".into())]
    );
}

#[tokio::test]
async fn tokens_shorter_than_asked_have_their_own_code_and_the_lifetime_is_told() {
    let h = harness(Setup::tokens_lasting(600)).await;
    h.script.lock().unwrap().uid = AMELIA.into();
    h.login().await.unwrap();
    let token = h.agent.token(TokenRequest::default()).await.unwrap();
    assert_eq!(token.lifetime_secs, Some(600));
    let refused = h
        .agent
        .token(TokenRequest {
            min_valid_secs: Some(7200),
            ..TokenRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), -32006, "{refused}");
    assert!(
        refused.to_string().contains("(600 s); ask for less"),
        "{refused}"
    );
}

#[tokio::test]
async fn activity_keeps_the_session_unlocked_and_a_locked_one_stays_locked() {
    let h = harness(Setup {
        // (Still in [agent]:) every program may call, as a sandbox lets them.
        session_toml: "client_policy = \"allow\"\n[session]\ninactivity_secs = 900\ninactivity_action = \"lock\"\n",
        ..Setup::default()
    })
    .await;
    let peer = cis2_core::peer::Peer::default();
    let mut grant = cis2_core::agent::ConnectionGrant::default();
    h.script.lock().unwrap().uid = AMELIA.into();
    h.login().await.unwrap();
    let started = h.agent.now();
    for _ in 0..3 {
        h.advance(600);
        // What the IPC server does for the `activity` method: the policy check, then the call.
        h.agent
            .authorize(&peer, "activity", &mut grant)
            .await
            .unwrap();
        let answer = h.agent.activity().unwrap();
        assert_eq!(answer.inactivity_secs, 900);
        assert_eq!(answer.inactivity_action, "lock");
        assert_eq!(answer.acts_at, Some(h.agent.now() + 900));
    }
    assert!(h.agent.now() >= started + 1800);
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    h.advance(901);
    assert!(eventually(|| h.agent.status().state == SessionState::Locked).await);
    assert_eq!(h.agent.activity().unwrap_err().code(), -32004);
}

// ---- the lifecycle timers, one driven tick at a time ---------------------------------------------
//
// These agents run no timer of their own (`Timers::Driven`) and read a clock that moves only when the
// test moves it: each test steps the clock and calls `tick(now)`, then looks at what that one tick did.

/// The events sent so far (the tick has finished, so everything it announced is there).
fn events_so_far(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

impl Harness {
    /// One tick of the agent's timers at its clock's time.
    async fn tick(&self) {
        self.agent.tick(self.agent.now()).await;
    }
}

/// A driven agent (no timer of its own) with the clinician signed in, and a subscription taken after
/// the sign-in: the events a test then sees are only those its own ticks caused.
async fn signed_in_driven(setup: Setup) -> (Harness, tokio::sync::broadcast::Receiver<Event>) {
    let h = harness(Setup {
        driven: true,
        ..setup
    })
    .await;
    h.login().await.unwrap();
    let events = h.agent.subscribe();
    (h, events)
}

#[tokio::test]
async fn the_first_tick_past_the_inactivity_limit_locks() {
    let (h, mut events) = signed_in_driven(Setup {
        session_toml: "[session]\ninactivity_secs = 900\ninactivity_action = \"lock\"\n",
        ..Setup::default()
    })
    .await;
    h.advance(890);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    assert_eq!(events_so_far(&mut events), []);
    h.advance(20);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::Locked);
    assert_eq!(
        events_so_far(&mut events),
        [Event::Locked {
            reason: "no program used the session for 15 minutes".into()
        }]
    );
}

/// The tick that locks for inactivity must not go on to renew the token in the same breath: a locked
/// session is not renewed in the background (it read `locked` once, before its own lock).
#[tokio::test]
async fn the_tick_that_locks_for_inactivity_starts_no_renewal() {
    let (h, mut events) = signed_in_driven(Setup {
        // Due for renewal (inside the 60 s margin) in the same tick that finds 900 s without activity.
        lifetimes: Lifetimes {
            access_token: 930,
            ..Lifetimes::default()
        },
        session_toml: "[session]\ninactivity_secs = 900\ninactivity_action = \"lock\"\n",
        ..Setup::default()
    })
    .await;
    h.advance(901);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::Locked);
    let seen = events_so_far(&mut events);
    assert!(
        matches!(seen.as_slice(), [Event::Locked { .. }]),
        "{seen:?}"
    );
    // Nor any later tick while it stays locked.
    h.advance(10);
    h.tick().await;
    assert_eq!(events_so_far(&mut events), []);
}

#[tokio::test]
async fn a_session_without_refresh_is_announced_once_then_ended_by_the_tick() {
    let (h, mut events) = signed_in_driven(Setup {
        refresh_tokens: false,
        lifetimes: Lifetimes {
            access_token: 600,
            ..Lifetimes::default()
        },
        session_toml: "[session]\nexpiring_notice_secs = 120\n",
        ..Setup::default()
    })
    .await;
    let expires_at = h.agent.status().expires_at.unwrap();
    h.advance(470);
    h.tick().await;
    assert_eq!(events_so_far(&mut events), []);
    assert!(!h.agent.expiring());
    h.advance(20);
    h.tick().await;
    assert_eq!(
        events_so_far(&mut events),
        [Event::SessionExpiring { expires_at }]
    );
    assert!(h.agent.expiring());
    // Announced once, not at every tick.
    h.advance(60);
    h.tick().await;
    assert_eq!(events_so_far(&mut events), []);
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    h.advance(60);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    let seen = events_so_far(&mut events);
    assert!(
        matches!(seen.as_slice(), [Event::SignedOut { reason }] if reason.contains("the session expired")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn the_first_tick_past_the_absolute_limit_signs_out() {
    let (h, mut events) = signed_in_driven(Setup {
        session_toml: "[session]\nabsolute_secs = 3600\ninactivity_action = \"none\"\n",
        lifetimes: Lifetimes {
            access_token: 7200,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    h.advance(3590);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
    h.advance(10);
    h.tick().await;
    assert_eq!(h.agent.status().state, SessionState::SignedOut);
    assert_eq!(
        events_so_far(&mut events),
        [Event::SignedOut {
            reason: "the session reached its maximum length (60 minutes)".into()
        }]
    );
}

/// After a failed background renewal the next attempt waits 1 s, after a second failure 2 s (each
/// ±20%, rounded to whole seconds of the clock: exactly 1 and 2 here).
#[tokio::test]
async fn the_background_renewal_backs_off_and_doubles_its_wait() {
    let (h, mut events) = signed_in_driven(Setup {
        lifetimes: Lifetimes {
            access_token: 300,
            ..Lifetimes::default()
        },
        ..Setup::default()
    })
    .await;
    // The provider fails the next two refreshes; the third succeeds.
    h.provider.provider.set_fault(
        serde_json::from_value(json!({"endpoint": "token", "mode": "error500", "count": 2}))
            .unwrap(),
    );
    // Inside the 60 s margin: the tick renews, and the provider fails it.
    h.advance(250);
    h.tick().await;
    assert_eq!(events_so_far(&mut events), []);
    // A tick at the same second does not ask again (it would have failed a second time, and the
    // one after would then succeed a second early).
    h.tick().await;
    h.advance(1);
    h.tick().await; // 1 s on: the second attempt, which fails.
    assert_eq!(events_so_far(&mut events), []);
    h.advance(1);
    h.tick().await; // 2 s on: still waiting (the wait doubled to 2 s).
    assert_eq!(events_so_far(&mut events), []);
    h.advance(1);
    h.tick().await; // 3 s on: the third attempt succeeds.
    let seen = events_so_far(&mut events);
    assert!(
        matches!(seen.as_slice(), [Event::TokenRefreshed { .. }]),
        "{seen:?}"
    );
    assert_eq!(h.agent.status().state, SessionState::SignedIn);
}
