//! The relay in process against the sandbox provider over real HTTP on loopback: exchanges, refusals,
//! back-channel logout tokens good and bad, the event stream, limits and metrics.

use cis2_jose::{Alg, SigningKey};
use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use cis2_mock_idp::{Client, Options, RunningProvider};
use cis2_oidc::authorize::{self, AuthParams};
use cis2_relay::RunningRelay;
use serde_json::{Value, json};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const CLIENT_ID: &str = "relay.apps.national";
const BEN: &str = "555021935108";
const BACKCHANNEL: &str = "http://schemas.openid.net/event/backchannel-logout";

struct Setup {
    provider: RunningProvider,
    provider_key: SigningKey,
    relay: RunningRelay,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn write_relay_config(dir: &std::path::Path, issuer: &str, extra: &str) -> std::path::PathBuf {
    let key = SigningKey::generate(Alg::RS512);
    std::fs::write(dir.join("relay-key.pem"), key.to_pkcs8_pem()).unwrap();
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\n\
             [signing]\nalg = \"RS512\"\nkeys = [\"relay-key.pem\"]\n{extra}"
        ),
    )
    .unwrap();
    path
}

async fn setup(extra: &str) -> Setup {
    let provider_key = SigningKey::generate(Alg::RS256);
    let provider = cis2_mock_idp::start(Options {
        signing_key: Some(provider_key.clone()),
        ..Options::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = extra.replace("{api_token_url}", &provider.provider.api_token_endpoint());
    let config =
        cis2_relay::config::load(&write_relay_config(dir.path(), &provider.issuer, &extra))
            .unwrap();
    let relay = cis2_relay::start(config).await.unwrap();
    let client: Client = serde_json::from_value(json!({
        "client_id": CLIENT_ID,
        "auth_method": "private_key_jwt",
        "jwks_uri": format!("{}.well-known/jwks.json", relay.url),
        "redirect_uris": ["http://127.0.0.1/callback"],
        "backchannel_logout_uri": format!("{}backchannel-logout", relay.url),
        "id_token_signed_response_alg": "RS512",
        "refresh_tokens": true,
        "rotate_refresh_tokens": true,
    }))
    .unwrap();
    provider.provider.register_client(client).unwrap();
    Setup {
        provider,
        provider_key,
        relay,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

/// A fresh code for Ben, as the agent would hold it: code, verifier, redirect URI, nonce.
async fn code_for(setup: &Setup) -> (String, String, String, String) {
    let redirect_uri = "http://127.0.0.1:49999/callback";
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
    let request = authorize::build(
        &format!("{}/authorize", setup.provider.issuer),
        &AuthParams {
            client_id: CLIENT_ID,
            redirect_uri,
            scopes: &scopes,
            acr_values: None,
            prompt: None,
            max_age: None,
        },
    );
    let mut browser = ScriptedBrowser::new(None);
    let mut script = Script::new(BEN, "smartcard");
    script.follow_callback = false;
    let outcome = browser.sign_in(&request.url, &script).await.unwrap();
    (
        outcome.param("code").expect("a code in the redirect"),
        request.code_verifier.expose().to_string(),
        redirect_uri.to_string(),
        request.nonce,
    )
}

async fn post_json(setup: &Setup, path: &str, body: &str) -> (u16, Value) {
    let response = setup
        .http
        .post(format!("{}{path}", setup.relay.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_code_becomes_validated_tokens_and_the_user_and_a_refresh_renews_them() {
    let setup = setup("").await;
    let (code, verifier, redirect_uri, nonce) = code_for(&setup).await;
    let response = setup
        .http
        .post(format!("{}v1/token", setup.relay.url))
        .json(&json!({"code": code, "code_verifier": verifier, "redirect_uri": redirect_uri}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["user"]["uid"], BEN);
    assert_eq!(answer["user"]["selected_role"]["id"], "5555666677778888");
    assert_eq!(answer["sub"], BEN);
    assert!(answer["expires_in"].as_u64().unwrap() > 3000);
    // The ID token is passed on untouched for the agent's own check of the nonce it alone knows.
    let id_token = cis2_jose::UnverifiedJwt::parse(answer["id_token"].as_str().unwrap()).unwrap();
    assert_eq!(id_token.claims["nonce"], nonce.as_str());
    // The provider saw this client's key: the assertion was signed by the relay's active key.
    let refresh_token = answer["refresh_token"].as_str().unwrap().to_string();

    let (status, renewed) = post_json(
        &setup,
        "v1/refresh",
        &json!({"refresh_token": refresh_token}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["sub"], BEN);
    assert_ne!(renewed["access_token"], answer["access_token"]);
    assert_ne!(
        renewed["refresh_token"].as_str(),
        Some(refresh_token.as_str())
    );
    // The rotated-out refresh token no longer works.
    let (status, refused) = post_json(
        &setup,
        "v1/refresh",
        &json!({"refresh_token": refresh_token}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(refused["error"], "invalid_grant");
    // Sign-out revokes the live one through the relay (the agent holds no client credential);
    // CIS2 then refuses it.
    let renewed_token = renewed["refresh_token"].as_str().unwrap();
    let (status, revoked) = post_json(
        &setup,
        "v1/revoke",
        &json!({"refresh_token": renewed_token}).to_string(),
    )
    .await;
    assert_eq!((status, revoked), (200, json!({"revoked": true})));
    let (status, refused) = post_json(
        &setup,
        "v1/refresh",
        &json!({"refresh_token": renewed_token}).to_string(),
    )
    .await;
    assert_eq!((status, &refused["error"]), (400, &json!("invalid_grant")));
    // The same code again: the provider refuses it and the relay says it is the agent's problem.
    let (status, replay) = post_json(
        &setup,
        "v1/token",
        &json!({"code": code, "code_verifier": verifier, "redirect_uri": redirect_uri}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{replay}");
    assert_eq!(replay["error"], "invalid_grant");
}

/// A stand-in provider that only counts connections: any call the relay makes shows up here.
fn counting_provider() -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut stream) = stream {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                // Never answers: the relay's time limit has to end the request.
                held.push(stream);
            }
        }
    });
    (format!("http://127.0.0.1:{port}/realms/Healthcare"), count)
}

/// A relay whose provider only counts connections, with `extra` config; the folder holds its files.
async fn relay_before_counting_provider(
    extra: &str,
) -> (RunningRelay, Arc<AtomicUsize>, tempfile::TempDir) {
    let (issuer, calls) = counting_provider();
    let dir = tempfile::tempdir().unwrap();
    let config = cis2_relay::config::load(&write_relay_config(dir.path(), &issuer, extra)).unwrap();
    (cis2_relay::start(config).await.unwrap(), calls, dir)
}

#[tokio::test]
async fn malformed_token_and_refresh_bodies_get_400_and_no_call_to_the_provider() {
    let (relay, calls, _dir) =
        relay_before_counting_provider("[limits]\nrequest_timeout_secs = 2\n").await;
    let http = reqwest::Client::new();
    let verifier = "v".repeat(43);
    let good = |field: &str, value: Value| {
        let mut body = json!({"code": "abc", "code_verifier": verifier, "redirect_uri": "http://127.0.0.1:5000/callback"});
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        body.to_string()
    };
    let cases: Vec<(&str, String)> = vec![
        ("not JSON", "code=abc".into()),
        ("empty", "".into()),
        ("an array", "[]".into()),
        ("truncated", "{\"code\": \"abc\"".into()),
        ("no code", good("code", Value::Null)),
        ("no verifier", good("code_verifier", Value::Null)),
        ("no redirect_uri", good("redirect_uri", Value::Null)),
        ("an unknown field", good("client_secret", json!("x"))),
        ("a number for code", good("code", json!(5))),
        ("an empty code", good("code", json!(""))),
        ("a code with a space", good("code", json!("a b"))),
        ("a code too long", good("code", json!("c".repeat(4097)))),
        (
            "a short verifier",
            good("code_verifier", json!("v".repeat(42))),
        ),
        (
            "a long verifier",
            good("code_verifier", json!("v".repeat(129))),
        ),
        (
            "a verifier with +",
            good("code_verifier", json!(format!("{}+", "v".repeat(42)))),
        ),
        (
            "a foreign redirect",
            good("redirect_uri", json!("https://evil.example/callback")),
        ),
        (
            "another path",
            good("redirect_uri", json!("http://127.0.0.1:5000/other")),
        ),
        (
            "not loopback",
            good("redirect_uri", json!("http://192.0.2.1:5000/callback")),
        ),
    ];
    for (what, body) in &cases {
        let response = http
            .post(format!("{}v1/token", relay.url))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{what}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "invalid_request", "{what}");
        let description = answer["error_description"].as_str().unwrap();
        assert!(
            !description.contains("abc") && !description.contains(&verifier),
            "{what}: {description}"
        );
    }
    for (path, body) in ["v1/refresh", "v1/revoke"].into_iter().flat_map(|path| {
        [
            "{}",
            "{\"refresh_token\": \"\"}",
            "{\"refresh_token\": 1}",
            "{\"refresh_token\": \"a\", \"x\": 1}",
            "nope",
        ]
        .map(|body| (path, body))
    }) {
        let response = http
            .post(format!("{}{path}", relay.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
    }
    let wrong_type = http
        .post(format!("{}v1/token", relay.url))
        .header("content-type", "text/plain")
        .body(good("x", Value::Null))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 415);
    let too_big = http
        .post(format!("{}v1/token", relay.url))
        .header("content-type", "application/json")
        .body(format!("{{\"code\": \"{}\"}}", "c".repeat(20_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the provider was never called"
    );

    // The control: a well-formed body does reach the provider (which never answers: 504).
    let response = http
        .post(format!("{}v1/token", relay.url))
        .header("content-type", "application/json")
        .body(good("x", Value::Null))
        .send()
        .await
        .unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(response.status(), 504);
}

async fn post_logout(setup: &Setup, body: &str, content_type: &str) -> (u16, Value) {
    let response = setup
        .http
        .post(format!("{}backchannel-logout", setup.relay.url))
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn metrics(setup: &Setup) -> String {
    metrics_of(&setup.relay).await
}

async fn metrics_of(relay: &RunningRelay) -> String {
    reqwest::get(format!("{}metrics", relay.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn form(token: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("logout_token", token)
        .finish()
}

fn logout_claims(setup: &Setup) -> serde_json::Map<String, Value> {
    let now = setup.provider.provider.now();
    json!({
        "iss": setup.provider.issuer, "aud": CLIENT_ID, "iat": now, "jti": cis2_jose::random_token(12),
        "sub": BEN, "sid": "sid-1", "events": {BACKCHANNEL: {}},
    })
    .as_object()
    .cloned()
    .unwrap()
}

#[tokio::test]
async fn each_malformed_logout_token_is_refused_with_400_and_ends_nothing() {
    let setup = setup("").await;
    let sign = |changes: Value| {
        let mut claims = logout_claims(&setup);
        for (name, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.remove(name);
            } else {
                claims.insert(name.clone(), value.clone());
            }
        }
        setup.provider_key.sign(&Value::Object(claims))
    };
    let now = setup.provider.provider.now();
    let stranger = SigningKey::generate(Alg::RS256);
    let unsigned = format!(
        "{}.{}.",
        cis2_jose::b64url(br#"{"alg":"none","typ":"JWT"}"#),
        cis2_jose::b64url(Value::Object(logout_claims(&setup)).to_string())
    );
    let hmac = cis2_jose::b64url(br#"{"alg":"HS256"}"#) + "." + &cis2_jose::b64url("{}") + ".sig";
    let cases: Vec<(&str, String)> = vec![
        ("not a JWT", form("not-a-jwt")),
        ("alg none", form(&unsigned)),
        ("HMAC", form(&hmac)),
        (
            "an unknown key",
            form(&stranger.sign(&Value::Object(logout_claims(&setup)))),
        ),
        ("a broken signature", form(&(sign(json!({})) + "x"))),
        (
            "another issuer",
            form(&sign(json!({"iss": "https://other.example:443/"}))),
        ),
        ("no issuer", form(&sign(json!({"iss": null})))),
        (
            "another audience",
            form(&sign(json!({"aud": "someone.apps.national"}))),
        ),
        ("no iat", form(&sign(json!({"iat": null})))),
        ("an old iat", form(&sign(json!({"iat": now - 3600})))),
        ("a future iat", form(&sign(json!({"iat": now + 3600})))),
        ("expired", form(&sign(json!({"exp": now - 60})))),
        ("no events", form(&sign(json!({"events": null})))),
        (
            "another event",
            form(&sign(json!({"events": {"http://example/x": {}}}))),
        ),
        ("a nonce", form(&sign(json!({"nonce": "n"})))),
        (
            "neither sid nor sub",
            form(&sign(json!({"sid": null, "sub": null}))),
        ),
        ("no jti", form(&sign(json!({"jti": null})))),
        ("no logout_token", "token=abc".into()),
        ("an empty logout_token", "logout_token=".into()),
        (
            "two logout_tokens",
            format!("{}&{}", form(&sign(json!({}))), form(&sign(json!({})))),
        ),
    ];
    for (what, body) in &cases {
        let (status, answer) = post_logout(&setup, body, "application/x-www-form-urlencoded").await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["error"], "invalid_request", "{what}");
    }
    let (status, _) = post_logout(&setup, &form(&sign(json!({}))), "application/json").await;
    assert_eq!(status, 400, "JSON instead of a form");

    // The control: a good token is taken, once.
    let good = form(&sign(json!({})));
    assert_eq!(
        post_logout(&setup, &good, "application/x-www-form-urlencoded")
            .await
            .0,
        200
    );
    let (status, answer) = post_logout(&setup, &good, "application/x-www-form-urlencoded").await;
    assert_eq!(status, 400);
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("replayed")
    );

    let metrics = metrics(&setup).await;
    assert!(
        metrics.contains("cis2_relay_logout_tokens_accepted_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "cis2_relay_logout_tokens_refused_total {}\n",
            cases.len() + 2
        )),
        "{metrics}"
    );
}

/// Reads server-sent events until one named `name` arrives; returns its data.
async fn next_event(response: &mut reqwest::Response, name: &str, buffer: &mut String) -> String {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            if event.as_deref() == Some(name) {
                return data;
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {name} event within 5 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before {name}"));
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Signs Ben in through the relay: the session id and the event-stream ticket that came with the tokens.
async fn session_and_ticket(setup: &Setup) -> (String, String) {
    let (code, verifier, redirect_uri, _) = code_for(setup).await;
    let (status, answer) = post_json(
        setup,
        "v1/token",
        &json!({"code": code, "code_verifier": verifier, "redirect_uri": redirect_uri}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let id_token = cis2_jose::UnverifiedJwt::parse(answer["id_token"].as_str().unwrap()).unwrap();
    (
        id_token.claims["sid"].as_str().unwrap().to_string(),
        answer["events_ticket"]
            .as_str()
            .expect("a ticket")
            .to_string(),
    )
}

#[tokio::test]
async fn a_logout_from_the_provider_reaches_the_subscriber_of_that_session_only() {
    let setup = setup("").await;
    let (sid, ticket) = session_and_ticket(&setup).await;
    let (other_sid, other_ticket) = session_and_ticket(&setup).await;
    assert_ne!(sid, other_sid);

    let subscribe = |sid: &str, ticket: &str| {
        let http = setup.http.clone();
        let url = format!("{}v1/events", setup.relay.url);
        let (sid, ticket) = (sid.to_string(), ticket.to_string());
        async move {
            http.get(url)
                .query(&[("sid", sid)])
                .bearer_auth(ticket)
                .send()
                .await
                .unwrap()
        }
    };
    // Without this session's ticket there is no stream, and no slot is taken.
    for (sid, ticket, why) in [
        (sid.as_str(), "", "required"),
        (sid.as_str(), other_ticket.as_str(), "another session"),
        (sid.as_str(), &ticket[..ticket.len() - 2], "altered"),
        (sid.as_str(), "v1.a.b.c.d.e", "malformed"),
    ] {
        let refused = subscribe(sid, ticket).await;
        assert_eq!(refused.status(), 403, "{why}");
        let refused: Value = refused.json().await.unwrap();
        assert_eq!(refused["error"], "invalid_ticket", "{why}");
        assert!(ticket.is_empty() || !refused.to_string().contains(ticket));
    }
    let other_sub = setup
        .http
        .get(format!("{}v1/events", setup.relay.url))
        .query(&[("sid", sid.as_str()), ("sub", "555000000000")])
        .bearer_auth(&ticket)
        .send()
        .await
        .unwrap();
    assert_eq!(other_sub.status(), 403, "a ticket is for one person too");
    // In the query, where proxies would log it, a ticket is not taken.
    let in_query = setup
        .http
        .get(format!("{}v1/events", setup.relay.url))
        .query(&[("sid", sid.as_str()), ("ticket", ticket.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(in_query.status(), 403);
    assert!(metrics(&setup).await.contains("cis2_relay_subscribers 0"));

    let mut mine = subscribe(&sid, &ticket).await;
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.headers()["content-type"], "text/event-stream");
    let mut other = subscribe(&other_sid, &other_ticket).await;
    let (mut mine_buffer, mut other_buffer) = (String::new(), String::new());
    next_event(&mut mine, "subscribed", &mut mine_buffer).await;
    next_event(&mut other, "subscribed", &mut other_buffer).await;

    // The provider ends the session and POSTs its own logout token to the relay.
    let deliveries = setup
        .provider
        .provider
        .logout_sessions(None, Some(&sid))
        .await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].status, Some(200), "{:?}", deliveries[0]);
    let data = next_event(&mut mine, "logout", &mut mine_buffer).await;
    assert_eq!(
        serde_json::from_str::<Value>(&data).unwrap()["sid"],
        sid.as_str()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.chunk())
            .await
            .is_err(),
        "another session's subscriber is told nothing"
    );

    // An agent that reconnects just after is told at once.
    let mut late = subscribe(&sid, &ticket).await;
    next_event(&mut late, "logout", &mut String::new()).await;

    // Missing or silly subscriptions are refused.
    for query in ["", "?sid=", "?sub=x", "?sid=a%20b"] {
        let response = setup
            .http
            .get(format!("{}v1/events{query}", setup.relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
    }
}

#[tokio::test]
async fn jwks_health_metrics_and_the_rate_limit() {
    let setup = setup("[limits]\nrequests_per_minute = 3\n").await;
    let jwks: Value = setup
        .http
        .get(format!("{}.well-known/jwks.json", setup.relay.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["alg"], "RS512");
    assert!(key.get("d").is_none(), "no private part");
    let jwk: cis2_jose::Jwk = serde_json::from_value(key.clone()).unwrap();
    assert_eq!(
        key["kid"].as_str(),
        jwk.thumbprint().as_deref(),
        "kid is the RFC 7638 thumbprint"
    );

    let health: Value = setup
        .http
        .get(format!("{}healthz", setup.relay.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");

    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = setup
            .http
            .post(format!("{}v1/refresh", setup.relay.url))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![400, 400, 400, 429, 429]);
    // Health and keys are not rate limited.
    for _ in 0..5 {
        let response = setup
            .http
            .get(format!("{}healthz", setup.relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let metrics = metrics(&setup).await;
    assert!(
        metrics.contains("cis2_relay_requests_total{endpoint=\"refresh\",status=\"400\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cis2_relay_requests_total{endpoint=\"refresh\",status=\"429\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cis2_relay_rate_limited_total 2\n"),
        "{metrics}"
    );
    let not_found = setup
        .http
        .get(format!("{}nothing-here", setup.relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(not_found.status(), 404);
    let body: Value = not_found.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

/// Reads from a raw connection until it closes or `within` passes; what arrived, and whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&received).into(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_a_stop_ends_the_event_streams() {
    use tokio::io::AsyncWriteExt;
    let (relay, calls, _dir) =
        relay_before_counting_provider("[limits]\nread_timeout_secs = 1\n").await;

    // Headers that never finish: the connection is closed once the client's time is up.
    let mut slow_headers = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    slow_headers
        .write_all(b"POST /v1/token HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (_, closed) = read_until_closed(&mut slow_headers, Duration::from_secs(5)).await;
    assert!(
        closed,
        "a half-sent request head still holds its connection after 5 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    // A body that stops short: 408 once the client's time is up, and CIS2 is not called.
    let mut slow_body = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/token HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
              Content-Length: 200\r\n\r\n{\"code\": \"abc\"",
        )
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("did not arrive within 1 seconds"),
        "{answer}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Meanwhile an ordinary request is answered.
    let health = reqwest::get(format!("{}healthz", relay.url)).await.unwrap();
    assert_eq!(health.status(), 200);

    // Stopping with an agent subscribed: its stream ends (so it reconnects elsewhere) and the
    // stop is prompt rather than waiting on a stream that would never finish.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ticket = relay.relay.tickets.issue("a-session", BEN, now);
    let mut stream = reqwest::Client::new()
        .get(format!("{}v1/events", relay.url))
        .query(&[("sid", "a-session")])
        .bearer_auth(&ticket)
        .send()
        .await
        .unwrap();
    next_event(&mut stream, "subscribed", &mut String::new()).await;
    tokio::time::timeout(Duration::from_secs(5), relay.stop())
        .await
        .expect("the relay stops within 5 s with an event stream open");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .expect("the event stream ends with the relay");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn a_session_holds_two_streams_at_most_and_a_late_logout_of_the_person_spares_newer_ones() {
    let (relay, _, _dir) = relay_before_counting_provider("").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ticket = relay.relay.tickets.issue("sid-1", BEN, now);
    let subscribe = || {
        reqwest::Client::new()
            .get(format!("{}v1/events", relay.url))
            .query(&[("sid", "sid-1")])
            .bearer_auth(&ticket)
            .send()
    };
    let subscribers = || async {
        metrics_of(&relay)
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix("cis2_relay_subscribers ")
                    .map(str::to_string)
            })
            .unwrap()
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = subscribe().await.unwrap();
        assert_eq!(stream.status(), 200);
        next_event(&mut stream, "subscribed", &mut String::new()).await;
        streams.push(stream);
    }
    // The third ended the first: one ticket holds two slots, however often it is used.
    let first = tokio::time::timeout(Duration::from_secs(5), streams[0].chunk())
        .await
        .expect("the oldest stream ends");
    assert!(matches!(first, Ok(None)), "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while subscribers().await != "2" {
        assert!(
            std::time::Instant::now() < deadline,
            "the oldest stream's slot was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A logout of the whole person that happened a minute ago, learned of only now (an instance
    // catching up on Redis), does not end streams opened since; one that happens now does.
    let person = cis2_oidc::logout::EndedSession {
        sid: None,
        sub: Some(BEN.into()),
    };
    relay
        .relay
        .fanout
        .deliver_late(person.clone(), Duration::from_secs(60));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), streams[2].chunk())
            .await
            .is_err(),
        "a stale logout of the person ended a newer stream"
    );
    relay.relay.fanout.deliver_late(person, Duration::ZERO);
    next_event(&mut streams[2], "logout", &mut String::new()).await;
}

/// What the relay logs, captured in memory.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn an_unauthenticated_logout_token_cannot_forge_a_log_line_and_its_refusal_names_a_logout_token()
 {
    let log = CapturedLog::default();
    let writer = log.clone();
    // The test's runtime has one thread, so the relay's tasks log through this subscriber.
    let _capture = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let setup = setup("").await;
    let forged_kid = "k\n2026-12-07T00:00:00.000000Z  INFO cis2_relay::server: back-channel logout accepted\u{1b}[2K";
    let header = json!({"alg": "RS256", "kid": forged_kid});
    let token = format!(
        "{}.{}.c2ln",
        cis2_jose::b64url(header.to_string()),
        cis2_jose::b64url(Value::Object(logout_claims(&setup)).to_string())
    );
    let (status, answer) =
        post_logout(&setup, &form(&token), "application/x-www-form-urlencoded").await;
    assert_eq!(status, 400, "{answer}");
    let description = answer["error_description"].as_str().unwrap();
    assert!(
        description.contains("the logout token is signed with key")
            && !description.contains("ID token"),
        "{description}"
    );
    assert!(!description.contains(['\n', '\u{1b}']), "{description:?}");

    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("back-channel logout refused"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log: {log:?}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-12-07T00:00:00"),
            "a line of the log was forged by the token: {log}"
        );
    }
    let refusal = log
        .lines()
        .find(|line| line.contains("back-channel logout refused"))
        .unwrap();
    assert!(
        refusal.contains("2026-12-07T00:00:00.000000Z  INFO"),
        "the kid stays inside its own line, escaped: {refusal}"
    );
}

const API_KEY: &str = "apim-app-key-1";

/// The relay with an `[[api_platform]]` registration at the sandbox's API-Platform-like token URL, the
/// application registered there under `registered` (the public key the platform holds).
async fn platform_setup(key: &SigningKey, registered: &SigningKey) -> (Setup, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let path = keys.path().join("apim.pem");
    std::fs::write(&path, key.to_pkcs8_pem()).unwrap();
    let setup = setup(&format!(
        "[[api_platform]]\naudience = \"apim\"\ntoken_url = \"{{api_token_url}}\"\n\
         api_key = \"{API_KEY}\"\nkey = \"{}\"\nkid = \"int-1\"\n",
        path.display()
    ))
    .await;
    let app: Client = serde_json::from_value(json!({
        "client_id": API_KEY,
        "auth_method": "private_key_jwt",
        "jwks": {"keys": [registered.with_kid("int-1").unwrap().public_jwk()]},
        "redirect_uris": ["https://ehr.example/unused"],
    }))
    .unwrap();
    setup.provider.provider.register_client(app).unwrap();
    (setup, keys)
}

/// Ben signed in through the relay: the session's ID token.
async fn signed_in_id_token(setup: &Setup) -> String {
    let (code, verifier, redirect_uri, _) = code_for(setup).await;
    let (status, signed_in) = post_json(
        setup,
        "v1/token",
        &json!({"code": code, "code_verifier": verifier, "redirect_uri": redirect_uri}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{signed_in}");
    signed_in["id_token"].as_str().unwrap().to_string()
}

async fn exchange(setup: &Setup, id_token: &str, audience: &str) -> (u16, Value) {
    post_json(
        setup,
        "v1/exchange",
        &json!({"id_token": id_token, "audience": audience}).to_string(),
    )
    .await
}

#[tokio::test]
async fn an_id_token_becomes_an_api_platform_token_and_bad_ones_are_refused_clearly() {
    let key = SigningKey::generate(Alg::RS512);
    let (setup, _keys) = platform_setup(&key, &key).await;
    let id_token = signed_in_id_token(&setup).await;

    let (status, first) = exchange(&setup, &id_token, "apim").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["audience"], "apim");
    assert_eq!(first["token_type"], "Bearer");
    assert!(first["expires_in"].as_u64().unwrap() > 60, "{first}");
    let text = first.to_string();
    assert!(!text.contains(&id_token), "the ID token is never echoed");
    assert!(first.get("refresh_token").is_none());
    // Each exchange is a new token (the platform issues one per call).
    let (status, second) = exchange(&setup, &id_token, "apim").await;
    assert_eq!(status, 200);
    assert_ne!(first["access_token"], second["access_token"]);

    let (status, unknown) = exchange(&setup, &id_token, "pds").await;
    assert_eq!(
        (status, &unknown["error"]),
        (404, &json!("unknown_audience"))
    );
    assert!(
        unknown["error_description"]
            .as_str()
            .unwrap()
            .contains("apim")
    );

    // Refused ID tokens: each a 400 invalid_grant saying which rule failed, and no call to the platform
    // with it (the platform would have refused them too; the relay says why first).
    let now = setup.provider.provider.now();
    let claims = cis2_jose::UnverifiedJwt::parse(&id_token).unwrap().claims;
    let forged = |changes: Value| {
        let mut claims = claims.clone();
        for (k, v) in changes.as_object().unwrap() {
            claims.insert(k.clone(), v.clone());
        }
        setup.provider_key.sign(&Value::Object(claims))
    };
    let mut tampered = id_token.clone().into_bytes();
    let dot = id_token.find('.').unwrap();
    tampered[dot + 3] = if tampered[dot + 3] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    for (token, words) in [
        (
            forged(json!({"exp": now - 600, "iat": now - 4000})),
            "expired",
        ),
        (
            forged(json!({"iss": "https://elsewhere.example:443/realms/x"})),
            "issued by",
        ),
        (
            forged(json!({"aud": "another.apps.national"})),
            "not for this application",
        ),
        (tampered, "ID token"),
    ] {
        let (status, refused) = exchange(&setup, &token, "apim").await;
        assert_eq!(status, 400, "{words}: {refused}");
        assert_eq!(refused["error"], "invalid_grant", "{refused}");
        let description = refused["error_description"].as_str().unwrap();
        assert!(description.contains(words), "{words}: {description}");
        assert!(!refused.to_string().contains(&token));
    }
    let (status, malformed) = post_json(&setup, "v1/exchange", r#"{"id_token": "a"}"#).await;
    assert_eq!(
        (status, &malformed["error"]),
        (400, &json!("invalid_request"))
    );
    assert!(metrics(&setup).await.contains("endpoint=\"exchange\""));
}

#[tokio::test]
async fn a_platform_that_refuses_the_relays_assertion_is_the_relays_misconfiguration() {
    // The platform holds another public key than the relay signs with.
    let (setup, _keys) = platform_setup(
        &SigningKey::generate(Alg::RS512),
        &SigningKey::generate(Alg::RS512),
    )
    .await;
    let id_token = signed_in_id_token(&setup).await;
    let (status, refused) = exchange(&setup, &id_token, "apim").await;
    assert_eq!(status, 502, "{refused}");
    assert_eq!(refused["error"], "relay_misconfigured");
    let description = refused["error_description"].as_str().unwrap();
    assert!(
        description.contains("API Platform") && description.contains("JWT is not valid"),
        "{description}"
    );
}

/// The exchange's latency through the relay, in process against the sandbox on loopback (a debug build:
/// for comparing changes, not capacity). Run: `cargo test -p cis2-relay --test api exchange_latency --
/// --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints p50/p99"]
async fn exchange_latency() {
    let key = SigningKey::generate(Alg::RS512);
    let (setup, _keys) = platform_setup(&key, &key).await;
    let id_token = signed_in_id_token(&setup).await;
    for _ in 0..20 {
        assert_eq!(exchange(&setup, &id_token, "apim").await.0, 200);
    }
    let mut took = Vec::new();
    for _ in 0..500 {
        let started = std::time::Instant::now();
        let (status, answer) = exchange(&setup, &id_token, "apim").await;
        took.push(started.elapsed());
        assert_eq!(status, 200, "{answer}");
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "exchange through the relay, 500 sequential: p50 {:?}, p99 {:?}, max {:?}",
        at(0.50),
        at(0.99),
        took[took.len() - 1]
    );
}
