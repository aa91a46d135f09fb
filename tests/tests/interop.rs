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

#[test]
fn signs_in_against_oidc_provider_configured_like_cis2() {
    if std::env::var("CIS2_SKIP_INTEROP").is_ok_and(|v| v == "1") {
        eprintln!("CIS2_SKIP_INTEROP=1: interop test skipped");
        return;
    }
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    assert!(
        interop.join("node_modules/oidc-provider").exists(),
        "run `npm ci --prefix tests/interop` first (or set CIS2_SKIP_INTEROP=1)"
    );
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(Alg::RS512);
    std::fs::write(dir.path().join("client-key.pem"), key.to_pkcs8_pem()).unwrap();
    let client = dir.path().join("client.json");
    std::fs::write(
        &client,
        json!({
            "client_id": "123456789012.apps.national",
            "jwks": {"keys": [key.public_jwk()]},
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

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"123456789012.apps.national\"\n\
             scopes = [\"openid\", \"profile\", \"email\", \"nhsperson\", \"nationalrbacaccess\", \"associatedorgs\", \"selectedrole\"]\n\
             acr_values = \"AAL3_ANY\"\nmax_age = 300\n\n[agent]\nclient_policy = \"allow\"\n\n[provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"client-key.pem\"\nalg = \"RS512\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(dir.path(), &["--config", config.to_str().unwrap()], &[]);
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
