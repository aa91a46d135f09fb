//! Interop: the agent, as `cis2-agentd`, signs in against panva's `oidc-provider` — an independent,
//! OpenID Certified provider — configured like CIS2 (tests/interop/provider.mjs): private_key_jwt RS512,
//! PKCE required, the realm path, CIS2's claims and `acr`. Needs `npm ci --prefix tests/interop`
//! (the README's test command does it); set CIS2_SKIP_INTEROP=1 to skip on a machine without Node.

use cis2_jose::{Alg, SigningKey};
use cis2_system_tests::{Agent, Process, json, stderr, stdout};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The interop provider, with one client registered under `jwk`; None when interop is skipped.
fn start_provider(dir: &Path, jwk: serde_json::Value) -> Option<(Process, String)> {
    if std::env::var("CIS2_SKIP_INTEROP").is_ok_and(|v| v == "1") {
        eprintln!("CIS2_SKIP_INTEROP=1: interop test skipped");
        return None;
    }
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    assert!(
        interop.join("node_modules/oidc-provider").exists(),
        "run `npm ci --prefix tests/interop` first (or set CIS2_SKIP_INTEROP=1)"
    );
    let client = dir.join("client.json");
    std::fs::write(
        &client,
        json!({
            "client_id": "123456789012.apps.national",
            "jwks": {"keys": [jwk]},
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "RS512",
            "id_token_signed_response_alg": "RS256",
        })
        .to_string(),
    )
    .unwrap();
    let mut command = Command::new("node");
    command
        .arg(interop.join("provider.mjs"))
        .args(["--port", "0", "--client"])
        .arg(&client);
    let mut provider = Process::start(command);
    let issuer = format!(
        "http://{}",
        provider.wait_for("http://", Duration::from_secs(60))
    );
    assert!(issuer.ends_with("/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare"));
    Some((provider, issuer))
}

/// An agent configured for the interop provider, signing client assertions with `key`;
/// `exchange_extra` is added to `[provider.exchange]`.
fn start_agent(dir: &Path, issuer: &str, key: &SigningKey, exchange_extra: &str) -> Agent {
    std::fs::write(dir.join("client-key.pem"), key.to_pkcs8_pem()).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"123456789012.apps.national\"\n\
             scopes = [\"openid\", \"profile\", \"email\", \"nhsperson\", \"nationalrbacaccess\", \"associatedorgs\", \"selectedrole\"]\n\
             acr_values = \"AAL3_ANY\"\nmax_age = 300\n\n[agent]\nclient_policy = \"allow\"\n\n[provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"client-key.pem\"\nalg = \"RS512\"\n{exchange_extra}"
        ),
    )
    .unwrap();
    Agent::start(dir, &["--config", config.to_str().unwrap()], &[])
}

#[test]
fn signs_in_against_oidc_provider_configured_like_cis2() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(Alg::RS512);
    let Some((mut provider, issuer)) = start_provider(dir.path(), json!(key.public_jwk())) else {
        return;
    };
    let agent = start_agent(dir.path(), &issuer, &key, "");
    let login = agent.ctl(&["login", "--json", "--timeout", "60"]);
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    let status = json(&login);
    assert_eq!(status["state"], "signed_in");
    let user = &status["user"];
    assert_eq!(user["uid"], "555021935107");
    assert_eq!(user["roles"].as_array().unwrap().len(), 2);
    assert_eq!(user["selected_role"]["id"], "555566667777");
    assert_eq!(user["selected_role"]["org_code"], "RX1");
    assert_eq!(user["assurance"]["acr"], "AAL3_ANY");
    assert_eq!(user["assurance"]["amr"], json!(["N3_SMARTCARD"]));
    let token = agent.ctl(&["token"]);
    assert_eq!(token.status.code(), Some(0), "{}", stderr(&token));
    assert!(stdout(&token).trim().len() > 20);
    assert_eq!(agent.ctl(&["logout"]).status.code(), Some(0));
    assert_eq!(agent.browser_opened(), 1);
    provider.kill();
}

#[test]
fn a_client_registered_under_a_named_kid_signs_in_only_with_that_kid() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(Alg::RS512);
    // Registered as EPS registers its key: under a name, not the RFC 7638 thumbprint.
    let mut jwk = json!(key.public_jwk());
    jwk["kid"] = json!("eps-cpt-ui-int");
    let Some((mut provider, issuer)) = start_provider(dir.path(), jwk) else {
        return;
    };
    // Sending the thumbprint (the default), the provider finds no key: invalid_client.
    let thumbprint_dir = dir.path().join("thumbprint");
    std::fs::create_dir_all(&thumbprint_dir).unwrap();
    let agent = start_agent(&thumbprint_dir, &issuer, &key, "");
    let refused = agent.ctl(&["login", "--timeout", "60"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("invalid_client"),
        "{}",
        stderr(&refused)
    );
    drop(agent);
    // With the registered kid configured, the same key signs in.
    let named_dir = dir.path().join("named");
    std::fs::create_dir_all(&named_dir).unwrap();
    let agent = start_agent(&named_dir, &issuer, &key, "kid = \"eps-cpt-ui-int\"\n");
    let login = agent.ctl(&["login", "--json", "--timeout", "60"]);
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    assert_eq!(json(&login)["state"], "signed_in");
    provider.kill();
}
