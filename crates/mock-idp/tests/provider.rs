//! The sandbox provider tested from the outside through an independent relying-party library (the
//! `openidconnect` crate) and plain HTTP, the way a client of CIS2 would meet it.

use cis2_jose::{Alg, JwkSet, SigningKey, UnverifiedJwt, random_token};
use cis2_mock_idp::browser::{Outcome, Script, ScriptedBrowser};
use cis2_mock_idp::{Client, ClientAuthMethod, Lifetimes, Options, RunningProvider};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthType, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, Scope,
    TokenResponse, reqwest,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const AMELIA: &str = "555021935107"; // 3 roles in 2 organisations
const BEN: &str = "555021935108"; // 1 role
const CHRIS: &str = "555021935109"; // no roles
const DANA: &str = "555021935110"; // AAL2 authenticator only
const REDIRECT: &str = "http://127.0.0.1:45678/callback";

fn client_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate(Alg::RS512))
}

fn client(id: &str, method: ClientAuthMethod) -> Client {
    let mut client: Client = serde_json::from_value(json!({
        "client_id": id,
        "auth_method": method,
        "redirect_uris": ["http://127.0.0.1/callback"],
        "post_logout_redirect_uris": ["http://127.0.0.1/signed-out"],
        "refresh_tokens": true,
        "rotate_refresh_tokens": true,
    }))
    .unwrap();
    match method {
        ClientAuthMethod::ClientSecretPost => {
            client.client_secret = Some("s3cret-for-tests".into())
        }
        ClientAuthMethod::PrivateKeyJwt => {
            client.jwks = Some(cis2_mock_idp::model::JwksValue::Table(JwkSet {
                keys: vec![client_key().public_jwk()],
            }))
        }
        ClientAuthMethod::None => {}
    }
    client
}

async fn provider_with(clients: Vec<Client>, lifetimes: Lifetimes) -> RunningProvider {
    cis2_mock_idp::start(Options {
        clients,
        lifetimes,
        ..Options::default()
    })
    .await
    .unwrap()
}

async fn provider() -> RunningProvider {
    provider_with(
        vec![
            client("pub.apps.national", ClientAuthMethod::None),
            client("secret.apps.national", ClientAuthMethod::ClientSecretPost),
            client("jwt.apps.national", ClientAuthMethod::PrivateKeyJwt),
        ],
        Lifetimes::default(),
    )
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

type Rp = openidconnect::core::CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

async fn rp(issuer: &str, client_id: &str, secret: Option<&str>) -> Rp {
    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(issuer.into()).unwrap(), &http())
            .await
            .expect("discovery through openidconnect");
    CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(client_id.into()),
        secret.map(|s| ClientSecret::new(s.into())),
    )
    .set_auth_type(AuthType::RequestBody)
    .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap())
}

struct Started {
    url: String,
    csrf: CsrfToken,
    nonce: Nonce,
    verifier: PkceCodeVerifier,
}

fn authorize(rp: &Rp, scopes: &[&str], extra: &[(&str, &str)]) -> Started {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = rp
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge);
    for scope in scopes {
        request = request.add_scope(Scope::new(scope.to_string()));
    }
    for (k, v) in extra {
        request = request.add_extra_param(*k, *v);
    }
    let (url, csrf, nonce) = request.url();
    Started {
        url: url.to_string(),
        csrf,
        nonce,
        verifier,
    }
}

async fn browse(url: &str, uid: &str, authenticator: &str, role: Option<&str>) -> Outcome {
    let mut script = Script::new(uid, authenticator);
    script.role = role.map(str::to_string);
    script.follow_callback = false;
    ScriptedBrowser::default()
        .sign_in(url, &script)
        .await
        .expect("the scripted browser reaches the redirect")
}

fn assertion(token_endpoint: &str, client_id: &str, alg: Alg, exp_in: i64, jti: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    client_key().with_alg(alg).sign(&json!({
        "iss": client_id, "sub": client_id, "aud": token_endpoint,
        "jti": jti, "iat": now, "exp": now + exp_in,
    }))
}

fn claims_of(jwt: &str) -> serde_json::Map<String, Value> {
    UnverifiedJwt::parse(jwt).unwrap().claims
}

/// Posts a raw form to the token endpoint and returns (status, JSON body).
async fn post_token(running: &RunningProvider, form: &[(&str, &str)]) -> (u16, Value) {
    let response = http()
        .post(format!("{}/access_token", running.issuer))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A code for the public client, plus the PKCE verifier that goes with it.
async fn code_for_public_client(running: &RunningProvider, uid: &str) -> (String, String) {
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    let started = authorize(&rp, &["profile"], &[]);
    let outcome = browse(&started.url, uid, "smartcard", None).await;
    (
        outcome.param("code").expect("a code"),
        started.verifier.secret().clone(),
    )
}

#[tokio::test]
async fn discovery_names_cis2_endpoints_and_the_issuer_with_its_port() {
    let running = provider().await;
    let doc: Value = http()
        .get(format!(
            "{}/.well-known/openid-configuration",
            running.issuer
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["issuer"], running.issuer);
    assert!(running.issuer.contains(&format!(
        ":{}/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare",
        running.addr.port()
    )));
    for (key, path) in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/access_token"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/connect/jwk_uri"),
        ("end_session_endpoint", "/connect/endSession"),
    ] {
        assert_eq!(doc[key], format!("{}{path}", running.issuer));
    }
    assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(doc["backchannel_logout_supported"], true);
    assert!(
        doc["scopes_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("nationalrbacaccess"))
    );
    assert!(
        doc["acr_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("AAL3_ANY"))
    );
}

#[tokio::test]
async fn full_sign_in_with_each_client_authentication_method() {
    let running = provider().await;
    for (client_id, secret) in [
        ("pub.apps.national", None),
        ("secret.apps.national", Some("s3cret-for-tests")),
        ("jwt.apps.national", None),
    ] {
        let rp = rp(&running.issuer, client_id, secret).await;
        let started = authorize(
            &rp,
            &[
                "profile",
                "email",
                "nationalrbacaccess",
                "associatedorgs",
                "selectedrole",
            ],
            &[("acr_values", "AAL3_ANY")],
        );
        let outcome = browse(&started.url, BEN, "smartcard", None).await;
        assert_eq!(
            outcome.param("state").as_deref(),
            Some(started.csrf.secret().as_str())
        );
        let code = outcome.param("code").expect("a code");
        let mut exchange = rp
            .exchange_code(AuthorizationCode::new(code))
            .unwrap()
            .set_pkce_verifier(started.verifier);
        let token_endpoint = rp.token_uri().unwrap().to_string();
        let jwt;
        if client_id.starts_with("jwt") {
            jwt = assertion(
                &token_endpoint,
                client_id,
                Alg::RS512,
                120,
                &random_token(16),
            );
            exchange = exchange
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", jwt.clone());
        }
        let tokens = exchange
            .request_async(&http())
            .await
            .unwrap_or_else(|e| panic!("{client_id}: {e:?}"));
        let id_token = tokens.id_token().expect("an ID token");
        let claims = id_token
            .claims(&rp.id_token_verifier(), &started.nonce)
            .unwrap_or_else(|e| panic!("openidconnect refused the ID token: {e}"));
        assert_eq!(claims.subject().as_str(), BEN);
        assert_eq!(claims.issuer().as_str(), running.issuer);
        let raw = claims_of(&id_token.to_string());
        assert_eq!(raw["selected_roleid"], "5555666677778888");
        assert_eq!(raw["acr"], "AAL3_ANY");
        assert_eq!(raw["amr"], json!(["N3_SMARTCARD"]));
        assert_eq!(raw["id_assurance_level"], "3");
        assert_eq!(raw["authentication_assurance_level"], "3");
        assert!(raw["auth_time"].as_u64().is_some() && raw["sid"].is_string());
        let info: Value = http()
            .get(format!("{}/userinfo", running.issuer))
            .bearer_auth(tokens.access_token().secret())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["sub"], BEN);
        assert_eq!(
            info["nhsid_nrbac_roles"][0]["role_code"],
            "S8000:G8000:R8001"
        );
        assert_eq!(info["nhsid_user_orgs"][0]["org_code"], "A9A5A");
        assert_eq!(info["email"], "ben.okafor@sandbox.nhs.invalid");
        assert!(
            info.get("nhsid_useruid").is_none(),
            "nhsperson was not asked"
        );
    }
}

#[tokio::test]
async fn rs256_assertions_and_rs512_id_tokens_per_client() {
    let mut jwt_client = client("rs512.apps.national", ClientAuthMethod::PrivateKeyJwt);
    jwt_client.id_token_signed_response_alg = Alg::RS512;
    let running = provider_with(vec![jwt_client], Lifetimes::default()).await;
    let rp = rp(&running.issuer, "rs512.apps.national", None).await;
    let started = authorize(&rp, &[], &[]);
    let code = browse(&started.url, BEN, "passkey", None)
        .await
        .param("code")
        .unwrap();
    let endpoint = format!("{}/access_token", running.issuer);
    let jwt = assertion(
        &endpoint,
        "rs512.apps.national",
        Alg::RS256,
        60,
        "rs256-jti",
    );
    let (status, body) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", started.verifier.secret()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &jwt),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id_token = UnverifiedJwt::parse(body["id_token"].as_str().unwrap()).unwrap();
    assert_eq!(id_token.alg(), Some("RS512"));
    let jwks: JwkSet = http()
        .get(format!("{}/connect/jwk_uri", running.issuer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(id_token.verify(&[Alg::RS512], &jwks).is_ok());
}

#[tokio::test]
async fn pkce_is_required_and_checked() {
    let running = provider().await;
    // No challenge at all: the authorize endpoint refuses with an error redirect.
    let url = format!(
        "{}/authorize?response_type=code&client_id=pub.apps.national&redirect_uri={}&scope=openid&state=s1",
        running.issuer,
        urlencode(REDIRECT)
    );
    let outcome = ScriptedBrowser::default()
        .sign_in(
            &url,
            &Script {
                follow_callback: false,
                ..Script::new(BEN, "smartcard")
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.param("error").as_deref(), Some("invalid_request"));
    assert_eq!(outcome.param("state").as_deref(), Some("s1"));
    let plain = format!(
        "{url}&code_challenge={}&code_challenge_method=plain",
        "a".repeat(43)
    );
    let outcome = ScriptedBrowser::default()
        .sign_in(
            &plain,
            &Script {
                follow_callback: false,
                ..Script::new(BEN, "smartcard")
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.param("error").as_deref(), Some("invalid_request"));

    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let base = [
        ("grant_type", "authorization_code"),
        ("client_id", "pub.apps.national"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
    ];
    let (status, body) = post_token(&running, &base).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "missing verifier: {body}"
    );
    let wrong = "w".repeat(43);
    let (status, body) = post_token(
        &running,
        &[&base[..], &[("code_verifier", wrong.as_str())]].concat(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "wrong verifier: {body}"
    );
    // The failed attempts did not burn the code.
    let (status, body) = post_token(
        &running,
        &[&base[..], &[("code_verifier", verifier.as_str())]].concat(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn codes_are_single_use_and_a_replay_revokes_what_they_bought() {
    let running = provider().await;
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "pub.apps.national"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    let (status, first) = post_token(&running, &form).await;
    assert_eq!(status, 200);
    let (status, body) = post_token(&running, &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    let userinfo = http()
        .get(format!("{}/userinfo", running.issuer))
        .bearer_auth(first["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        userinfo.status().as_u16(),
        401,
        "the first access token must be revoked after a replay"
    );
}

#[tokio::test]
async fn codes_are_bound_to_client_and_redirect_uri_and_expire() {
    let running = provider().await;
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let (status, body) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "pub.apps.national"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:45679/callback"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "foreign redirect_uri: {body}"
    );
    let (status, body) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "secret.apps.national"),
            ("client_secret", "s3cret-for-tests"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "another client: {body}"
    );

    let (code, verifier) = code_for_public_client(&running, BEN).await;
    running.provider.advance_clock(61);
    let (status, body) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "pub.apps.national"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "expired code: {body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}

#[tokio::test]
async fn an_unregistered_redirect_uri_is_never_redirected_to() {
    let running = provider().await;
    let url = format!(
        "{}/authorize?response_type=code&client_id=pub.apps.national&redirect_uri={}&scope=openid&code_challenge={}&code_challenge_method=S256",
        running.issuer,
        urlencode("https://evil.example/callback"),
        "a".repeat(43)
    );
    let response = http().get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.headers().get("location").is_none());
    assert!(response.text().await.unwrap().contains("not registered"));
    let unknown = url.replace("pub.apps.national", "nobody.apps.national");
    assert_eq!(
        http().get(&unknown).send().await.unwrap().status().as_u16(),
        400
    );
}

#[tokio::test]
async fn client_assertions_are_checked_like_cis2_checks_them() {
    let running = provider().await;
    let endpoint = format!("{}/access_token", running.issuer);
    let id = "jwt.apps.national";
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            assertion(&endpoint, id, Alg::RS512, -30, &random_token(8)),
        ),
        (
            "too far ahead",
            assertion(&endpoint, id, Alg::RS512, 3600, &random_token(8)),
        ),
        (
            "mis-addressed",
            assertion(
                &format!("{}/userinfo", running.issuer),
                id,
                Alg::RS512,
                60,
                &random_token(8),
            ),
        ),
        (
            "issuer without the port",
            assertion(
                &endpoint.replace(&format!(":{}", running.addr.port()), ""),
                id,
                Alg::RS512,
                60,
                &random_token(8),
            ),
        ),
        (
            "foreign key",
            SigningKey::generate(Alg::RS512).sign(
                &json!({"iss": id, "sub": id, "aud": endpoint, "jti": "x", "exp": 4102444800u64}),
            ),
        ),
    ];
    for (case, jwt) in cases {
        let (code, verifier) = {
            let rp = rp(&running.issuer, id, None).await;
            let started = authorize(&rp, &[], &[]);
            (
                browse(&started.url, BEN, "smartcard", None)
                    .await
                    .param("code")
                    .unwrap(),
                started.verifier.secret().clone(),
            )
        };
        let (status, body) = post_token(
            &running,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &jwt),
            ],
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{case}: {body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("JWT is not valid"),
            "{case}: {body}"
        );
    }
    // A replayed jti: the second use of a good assertion is refused.
    let jwt = assertion(&endpoint, id, Alg::RS512, 60, "once-only");
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let rp = rp(&running.issuer, id, None).await;
        let started = authorize(&rp, &[], &[]);
        let code = browse(&started.url, BEN, "smartcard", None)
            .await
            .param("code")
            .unwrap();
        let (status, _) = post_token(
            &running,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", started.verifier.secret()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &jwt),
            ],
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 401]);
}

#[tokio::test]
async fn a_wrong_client_secret_is_invalid_client() {
    let running = provider().await;
    let rp = rp(
        &running.issuer,
        "secret.apps.national",
        Some("not-the-secret"),
    )
    .await;
    let started = authorize(&rp, &[], &[]);
    let code = browse(&started.url, BEN, "smartcard", None)
        .await
        .param("code")
        .unwrap();
    let err = rp
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("invalid_client") || text.contains("InvalidClient"),
        "{text}"
    );
}

#[tokio::test]
async fn role_selection_with_none_one_and_three_roles() {
    let running = provider().await;
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    for (uid, role, expect_page, expected) in [
        (CHRIS, None, false, None),
        (BEN, None, false, Some("5555666677778888")),
        (
            AMELIA,
            Some("555021935107003"),
            true,
            Some("555021935107003"),
        ),
    ] {
        let started = authorize(&rp, &["selectedrole", "nationalrbacaccess"], &[]);
        let outcome = browse(&started.url, uid, "smartcard", role).await;
        assert_eq!(outcome.saw_role_page, expect_page, "{uid}");
        let tokens = rp
            .exchange_code(AuthorizationCode::new(outcome.param("code").unwrap()))
            .unwrap()
            .set_pkce_verifier(started.verifier)
            .request_async(&http())
            .await
            .unwrap();
        let raw = claims_of(&tokens.id_token().unwrap().to_string());
        assert_eq!(
            raw.get("selected_roleid").and_then(Value::as_str),
            expected,
            "{uid}"
        );
    }
    // changedrole shows the role page again for a user with several roles.
    let started = authorize(&rp, &["changedrole"], &[]);
    assert!(
        browse(&started.url, AMELIA, "smartcard", Some("555021935107002"))
            .await
            .saw_role_page
    );
}

#[tokio::test]
async fn acr_values_decide_the_authenticators() {
    let running = provider().await;
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    let started = authorize(&rp, &[], &[("acr_values", "AAL3_ANY")]);
    let page = http()
        .get(&started.url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("value=\"smartcard\"") && !page.contains("value=\"authenticator_app\""));
    let err = ScriptedBrowser::default()
        .sign_in(&started.url, &Script::new(DANA, "authenticator_app"))
        .await
        .unwrap_err();
    assert!(err.contains("not accepted"), "{err}");
    let started = authorize(&rp, &[], &[("acr_values", "AAL3_ANY")]);
    let err = ScriptedBrowser::default()
        .sign_in(&started.url, &Script::new(DANA, "smartcard"))
        .await
        .unwrap_err();
    assert!(err.contains("no authenticator strong enough"), "{err}");

    let started = authorize(&rp, &[], &[("acr_values", "AAL2_OR_AAL3_ANY")]);
    let outcome = browse(&started.url, DANA, "authenticator_app", None).await;
    let tokens = rp
        .exchange_code(AuthorizationCode::new(outcome.param("code").unwrap()))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap();
    let raw = claims_of(&tokens.id_token().unwrap().to_string());
    assert_eq!(raw["acr"], "AAL2_OR_AAL3_ANY");
    assert_eq!(raw["amr"], json!(["TOTP"]));
    assert_eq!(raw["authentication_assurance_level"], "2");
    assert_eq!(raw["id_assurance_level"], "2");
}

#[tokio::test]
async fn prompt_login_and_max_age_are_honoured() {
    let running = provider().await;
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    let mut browser = ScriptedBrowser::default();
    let quiet = Script {
        follow_callback: false,
        ..Script::new(BEN, "smartcard")
    };
    let first = authorize(&rp, &[], &[]);
    browser.sign_in(&first.url, &quiet).await.unwrap();
    // The browser's session is reused: the second authorize redirects straight back.
    let second = authorize(&rp, &[], &[]);
    let response = reqwest_with_cookie(&mut browser, &second.url).await;
    assert_eq!(response, 302, "SSO session reused");
    let forced = authorize(&rp, &[], &[("prompt", "login")]);
    assert_eq!(
        reqwest_with_cookie(&mut browser, &forced.url).await,
        200,
        "prompt=login shows the sign-in page"
    );
    running.provider.advance_clock(301);
    let aged = authorize(&rp, &[], &[("max_age", "300")]);
    assert_eq!(
        reqwest_with_cookie(&mut browser, &aged.url).await,
        200,
        "max_age exceeded shows the sign-in page"
    );
    let young = authorize(&rp, &[], &[("max_age", "3600")]);
    assert_eq!(reqwest_with_cookie(&mut browser, &young.url).await, 302);
    let none = authorize(&rp, &[], &[("prompt", "none")]);
    let fresh = ScriptedBrowser::default()
        .sign_in(&none.url, &quiet)
        .await
        .unwrap();
    assert_eq!(fresh.param("error").as_deref(), Some("login_required"));
}

async fn reqwest_with_cookie(browser: &mut ScriptedBrowser, url: &str) -> u16 {
    browser.visit(url).await.unwrap().0
}

#[tokio::test]
async fn key_rotation_is_seen_by_the_client() {
    let running = provider().await;
    let jwks_url = format!("{}/connect/jwk_uri", running.issuer);
    let kids = |set: JwkSet| {
        set.keys
            .into_iter()
            .map(|k| k.kid.unwrap())
            .collect::<Vec<_>>()
    };
    let before = kids(
        http()
            .get(&jwks_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(before.len(), 1);
    let admin = |path: &str| format!("http://{}/admin/keys/{path}", running.addr);
    let next: Value = http()
        .post(admin("next"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = kids(
        http()
            .get(&jwks_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(published.len(), 2);
    assert!(published.contains(&next["kid"].as_str().unwrap().to_string()));
    http().post(admin("activate")).send().await.unwrap();
    // A client discovering now verifies tokens from the new key.
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    let started = authorize(&rp, &[], &[]);
    let code = browse(&started.url, BEN, "smartcard", None)
        .await
        .param("code")
        .unwrap();
    let tokens = rp
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap();
    let id_token = tokens.id_token().unwrap();
    id_token
        .claims(&rp.id_token_verifier(), &started.nonce)
        .expect("verifies with the rotated key");
    assert_eq!(
        UnverifiedJwt::parse(&id_token.to_string()).unwrap().kid(),
        next["kid"].as_str()
    );
    let retired: Value = http()
        .post(admin("retire"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retired["retired"], json!([before[0]]));
    assert_eq!(
        kids(
            http()
                .get(&jwks_url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        ),
        vec![next["kid"].as_str().unwrap().to_string()]
    );
}

#[tokio::test]
async fn refresh_tokens_rotate_or_not_per_client() {
    let mut keeper = client("keeper.apps.national", ClientAuthMethod::None);
    keeper.rotate_refresh_tokens = false;
    let mut no_refresh = client("norefresh.apps.national", ClientAuthMethod::None);
    no_refresh.refresh_tokens = false;
    let running = provider_with(
        vec![
            client("pub.apps.national", ClientAuthMethod::None),
            keeper,
            no_refresh,
        ],
        Lifetimes::default(),
    )
    .await;
    for (id, rotates) in [("pub.apps.national", true), ("keeper.apps.national", false)] {
        let rp = rp(&running.issuer, id, None).await;
        let started = authorize(&rp, &[], &[]);
        let code = browse(&started.url, BEN, "smartcard", None)
            .await
            .param("code")
            .unwrap();
        let tokens = rp
            .exchange_code(AuthorizationCode::new(code))
            .unwrap()
            .set_pkce_verifier(started.verifier)
            .request_async(&http())
            .await
            .unwrap();
        let first = tokens.refresh_token().unwrap().clone();
        let renewed = rp
            .exchange_refresh_token(&first)
            .unwrap()
            .request_async(&http())
            .await
            .unwrap();
        assert_ne!(
            renewed.access_token().secret(),
            tokens.access_token().secret()
        );
        let second = renewed.refresh_token().unwrap().clone();
        assert_eq!(second.secret() != first.secret(), rotates, "{id}");
        let again = rp
            .exchange_refresh_token(&RefreshToken::new(first.secret().clone()))
            .unwrap()
            .request_async(&http())
            .await;
        assert_eq!(
            again.is_ok(),
            !rotates,
            "{id}: the old refresh token after rotation"
        );
        let renewed_id = claims_of(&renewed.id_token().unwrap().to_string());
        assert!(renewed_id.get("nonce").is_none());
    }
    let rp = rp(&running.issuer, "norefresh.apps.national", None).await;
    let started = authorize(&rp, &[], &[]);
    let code = browse(&started.url, BEN, "smartcard", None)
        .await
        .param("code")
        .unwrap();
    let tokens = rp
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap();
    assert!(tokens.refresh_token().is_none());
}

#[tokio::test]
async fn revoked_grants_end_refresh_and_userinfo() {
    let running = provider().await;
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let (_, tokens) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "pub.apps.national"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    let revoked = http()
        .post(format!("http://{}/admin/users/{BEN}/revoke", running.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    let (status, body) = post_token(
        &running,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "pub.apps.national"),
            ("refresh_token", tokens["refresh_token"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let info = http()
        .get(format!("{}/userinfo", running.issuer))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(info.status().as_u16(), 401);
}

/// A relying party's back-channel logout endpoint: records each logout token it receives.
async fn logout_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/backchannel-logout",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let form: HashMap<String, String> =
                    url::form_urlencoded::parse(&body).into_owned().collect();
                sink.lock()
                    .unwrap()
                    .push(form.get("logout_token").cloned().unwrap_or_default());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/backchannel-logout",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test]
async fn back_channel_logout_reaches_the_client_on_end_session_and_on_request() {
    let (uri, received) = logout_receiver().await;
    let mut rp_client = client("bcl.apps.national", ClientAuthMethod::None);
    rp_client.backchannel_logout_uri = Some(uri);
    let running = provider_with(vec![rp_client], Lifetimes::default()).await;
    let rp = rp(&running.issuer, "bcl.apps.national", None).await;
    let mut browser = ScriptedBrowser::default();
    let started = authorize(&rp, &[], &[]);
    let outcome = browser
        .sign_in(
            &started.url,
            &Script {
                follow_callback: false,
                ..Script::new(BEN, "smartcard")
            },
        )
        .await
        .unwrap();
    let tokens = rp
        .exchange_code(AuthorizationCode::new(outcome.param("code").unwrap()))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap();
    let id_token = tokens.id_token().unwrap().to_string();
    let sid = claims_of(&id_token)["sid"].as_str().unwrap().to_string();

    let end = format!(
        "{}/connect/endSession?id_token_hint={id_token}&post_logout_redirect_uri={}&state=bye",
        running.issuer,
        urlencode("http://127.0.0.1/signed-out")
    );
    let response = http().get(&end).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 302);
    assert_eq!(
        response.headers()["location"],
        "http://127.0.0.1/signed-out?state=bye"
    );
    let tokens_received = received.lock().unwrap().clone();
    assert_eq!(tokens_received.len(), 1);
    let jwks: JwkSet = http()
        .get(format!("{}/connect/jwk_uri", running.issuer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let logout = UnverifiedJwt::parse(&tokens_received[0])
        .unwrap()
        .verify(&[Alg::RS256], &jwks)
        .unwrap();
    assert_eq!(logout["iss"], running.issuer);
    assert_eq!(logout["aud"], "bcl.apps.national");
    assert_eq!(logout["sid"], sid);
    assert_eq!(logout["sub"], BEN);
    assert!(logout["events"]["http://schemas.openid.net/event/backchannel-logout"].is_object());
    assert!(logout.get("nonce").is_none());
    // The session is gone: the refresh token no longer works.
    assert!(
        rp.exchange_refresh_token(tokens.refresh_token().unwrap())
            .unwrap()
            .request_async(&http())
            .await
            .is_err()
    );

    // On an admin request, by subject.
    let started = authorize(&rp, &[], &[]);
    let code = browse(&started.url, BEN, "smartcard", None)
        .await
        .param("code")
        .unwrap();
    rp.exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&http())
        .await
        .unwrap();
    let answer: Value = http()
        .post(format!("http://{}/admin/backchannel-logout", running.addr))
        .json(&json!({"sub": BEN}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["deliveries"][0]["status"], 200);
    assert_eq!(received.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn every_fault_mode_of_token_and_userinfo() {
    let running = provider_with(
        vec![client("pub.apps.national", ClientAuthMethod::None)],
        Lifetimes::default(),
    )
    .await;
    let admin = format!("http://{}/admin/faults", running.addr);
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "pub.apps.national"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];

    http()
        .post(&admin)
        .json(&json!({"endpoint": "token", "mode": "error500", "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(post_token(&running, &form).await.0, 500);
    http()
        .post(&admin)
        .json(&json!({"endpoint": "token", "mode": "malformed", "count": 1}))
        .send()
        .await
        .unwrap();
    let response = http()
        .post(format!("{}/access_token", running.issuer))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(serde_json::from_str::<Value>(&response.text().await.unwrap()).is_err());
    http()
        .post(&admin)
        .json(&json!({"endpoint": "token", "mode": "hang"}))
        .send()
        .await
        .unwrap();
    let hung = reqwest::Client::new()
        .post(format!("{}/access_token", running.issuer))
        .form(&form)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    http()
        .post(&admin)
        .json(&json!({"endpoint": "token", "mode": "none"}))
        .send()
        .await
        .unwrap();
    // Faults do not consume the code: the real exchange still works afterwards.
    let (status, tokens) = post_token(&running, &form).await;
    assert_eq!(status, 200, "{tokens}");

    let bearer = tokens["access_token"].as_str().unwrap();
    let userinfo = || {
        http()
            .get(format!("{}/userinfo", running.issuer))
            .bearer_auth(bearer)
    };
    http()
        .post(&admin)
        .json(&json!({"endpoint": "userinfo", "mode": "error500", "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(userinfo().send().await.unwrap().status().as_u16(), 500);
    http()
        .post(&admin)
        .json(&json!({"endpoint": "userinfo", "mode": "malformed", "count": 1}))
        .send()
        .await
        .unwrap();
    assert!(
        userinfo()
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .is_err()
    );
    http()
        .post(&admin)
        .json(&json!({"endpoint": "userinfo", "mode": "hang", "count": 1}))
        .send()
        .await
        .unwrap();
    assert!(
        userinfo()
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .unwrap_err()
            .is_timeout()
    );
    assert_eq!(
        userinfo().send().await.unwrap().status().as_u16(),
        200,
        "count 1 ends the fault"
    );
}

#[tokio::test]
async fn malformed_requests_get_oauth_errors_not_crashes() {
    let running = provider().await;
    let token = format!("{}/access_token", running.issuer);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http()
                .post(&token)
                .body("grant_type=authorization_code")
                .header("content-type", "text/plain"),
            400,
            "invalid_request",
        ),
        (
            http().post(&token).form(&[
                ("grant_type", "password"),
                ("client_id", "pub.apps.national"),
            ]),
            400,
            "unsupported_grant_type",
        ),
        (
            http()
                .post(&token)
                .form(&[("client_id", "pub.apps.national")]),
            400,
            "invalid_request",
        ),
        (
            http().post(&token).form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "nobody"),
            ]),
            401,
            "invalid_client",
        ),
        (
            http()
                .post(&token)
                .form(&[("grant_type", "authorization_code")]),
            401,
            "invalid_client",
        ),
        (
            http()
                .post(&token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("client_id=a&client_id=b"),
            400,
            "invalid_request",
        ),
        (
            http().post(&token).form(&[
                ("grant_type", "authorization_code"),
                ("client_id", "pub.apps.national"),
                ("code", "nope"),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &"v".repeat(43)),
            ]),
            400,
            "invalid_grant",
        ),
        (
            http().post(&token).form(&[
                ("grant_type", "authorization_code"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", "garbage"),
            ]),
            401,
            "invalid_client",
        ),
        (
            http().get(format!("{}/userinfo", running.issuer)),
            401,
            "invalid_token",
        ),
        (
            http()
                .get(format!("{}/userinfo", running.issuer))
                .bearer_auth("forged"),
            401,
            "invalid_token",
        ),
    ];
    for (i, (request, status, error)) in cases.into_iter().enumerate() {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "case {i}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], error, "case {i}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
    let rp = rp(&running.issuer, "pub.apps.national", None).await;
    let started = authorize(&rp, &["superuser"], &[]);
    assert_eq!(
        browse(&started.url, BEN, "smartcard", None)
            .await
            .param("error")
            .as_deref(),
        Some("invalid_scope")
    );
    let started = authorize(&rp, &[], &[("response_type", "token")]);
    assert!(
        http()
            .get(&started.url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
            < 500
    );
    let started = authorize(&rp, &[], &[("acr_values", "AAL9")]);
    assert_eq!(
        browse(&started.url, BEN, "smartcard", None)
            .await
            .param("error")
            .as_deref(),
        Some("invalid_request")
    );
    let bad_form = http()
        .post(format!("http://{}/sandbox/login", running.addr))
        .form(&[("txn", "unknown")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_form.status().as_u16(), 400);
}

#[tokio::test]
async fn https_with_an_explicit_port_in_the_issuer() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let running = cis2_mock_idp::start(Options {
        tls: Some(cis2_mock_idp::TlsPem {
            cert: cert.cert.pem(),
            key: cert.key_pair.serialize_pem(),
        }),
        clients: vec![client("pub.apps.national", ClientAuthMethod::None)],
        ..Options::default()
    })
    .await
    .unwrap();
    assert!(running.issuer.starts_with(&format!(
        "https://127.0.0.1:{}/openam/",
        running.addr.port()
    )));
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let metadata = CoreProviderMetadata::discover_async(
        IssuerUrl::new(running.issuer.clone()).unwrap(),
        &https,
    )
    .await
    .unwrap();
    assert_eq!(metadata.issuer().as_str(), running.issuer);
    let rp = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new("pub.apps.national".into()),
        None,
    )
    .set_auth_type(AuthType::RequestBody)
    .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap());
    let started = authorize(&rp, &[], &[]);
    let mut script = Script::new(BEN, "smartcard");
    script.follow_callback = false;
    let outcome = ScriptedBrowser::new(Some(&cert.cert.pem()))
        .sign_in(&started.url, &script)
        .await
        .unwrap();
    let tokens = rp
        .exchange_code(AuthorizationCode::new(outcome.param("code").unwrap()))
        .unwrap()
        .set_pkce_verifier(started.verifier)
        .request_async(&https)
        .await
        .unwrap();
    tokens
        .id_token()
        .unwrap()
        .claims(&rp.id_token_verifier(), &started.nonce)
        .unwrap();
}

#[tokio::test]
async fn the_issuer_can_be_spelled_with_443() {
    // Bind 443 on a loopback alias where the test may (root on CI); skip quietly where it may not.
    let Ok(running) = cis2_mock_idp::start(Options {
        bind: "127.0.0.73".parse().unwrap(),
        port: 443,
        ..Options::default()
    })
    .await
    else {
        eprintln!(
            "cannot bind 127.0.0.73:443 here; the explicit-port spelling is covered by issuer_for"
        );
        assert_eq!(
            cis2_mock_idp::issuer_for(true, "h", 443),
            format!("https://h:443{}", cis2_mock_idp::REALM_PATH)
        );
        return;
    };
    assert_eq!(
        running.issuer,
        format!("http://127.0.0.73:443{}", cis2_mock_idp::REALM_PATH)
    );
    let doc: Value = http()
        .get(format!(
            "{}/.well-known/openid-configuration",
            running.issuer
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["issuer"], running.issuer,
        "served byte for byte, :443 included"
    );
}

#[tokio::test]
async fn scripted_id_token_expectations_apply_once() {
    let running = provider().await;
    let admin = format!("http://{}/admin/next-token", running.addr);
    http().post(&admin).json(&json!({"id_token_claims": {"aud": "someone-else"}, "id_token_remove": ["nonce"], "userinfo_claims": {"sub": "999"}})).send().await.unwrap().error_for_status().unwrap();
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "pub.apps.national"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    let (_, tokens) = post_token(&running, &form).await;
    let claims = claims_of(tokens["id_token"].as_str().unwrap());
    assert_eq!(claims["aud"], "someone-else");
    assert!(claims.get("nonce").is_none());
    let info: Value = http()
        .get(format!("{}/userinfo", running.issuer))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["sub"], "999");
    let (code, verifier) = code_for_public_client(&running, BEN).await;
    let (_, tokens) = post_token(
        &running,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "pub.apps.national"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(
        claims_of(tokens["id_token"].as_str().unwrap())["aud"],
        "pub.apps.national"
    );

    for (signing, alg) in [
        ("none", "none"),
        ("hs256_client_secret", "HS256"),
        ("no_kid", "RS256"),
    ] {
        http()
            .post(&admin)
            .json(&json!({"signing": signing}))
            .send()
            .await
            .unwrap();
        let (code, verifier) = code_for_public_client(&running, BEN).await;
        let (_, tokens) = post_token(
            &running,
            &[
                ("grant_type", "authorization_code"),
                ("client_id", "pub.apps.national"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        let token = UnverifiedJwt::parse(tokens["id_token"].as_str().unwrap()).unwrap();
        assert_eq!(token.alg(), Some(alg), "{signing}");
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn private_key_jwt_keys_can_come_from_a_jwks_url() {
    // The vendor publishes its keys (as cis2-relay will); the provider fetches them per assertion.
    let jwks = json!({"keys": [client_key().public_jwk()]});
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_uri = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut by_url = client("byurl.apps.national", ClientAuthMethod::PrivateKeyJwt);
    by_url.jwks = None;
    by_url.jwks_uri = Some(jwks_uri);
    let running = provider_with(vec![by_url], Lifetimes::default()).await;
    let rp = rp(&running.issuer, "byurl.apps.national", None).await;
    let endpoint = format!("{}/access_token", running.issuer);
    for (key, expected) in [
        (client_key().clone(), 200),
        (SigningKey::generate(Alg::RS512), 401),
    ] {
        let started = authorize(&rp, &[], &[]);
        let code = browse(&started.url, BEN, "smartcard", None)
            .await
            .param("code")
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let jwt = key.sign(&json!({"iss": "byurl.apps.national", "sub": "byurl.apps.national", "aud": endpoint, "jti": random_token(8), "exp": now + 60}));
        let (status, body) = post_token(
            &running,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", started.verifier.secret()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &jwt),
            ],
        )
        .await;
        assert_eq!(status, expected, "{body}");
    }
}
