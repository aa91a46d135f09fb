//! Our ID token rules (`validate::unverified_issuer` to refuse another provider's token first, then
//! `verify_signature` + `check_claims`, as the relying party runs them) against an independent
//! implementation, `openidconnect` 4's `IdTokenVerifier` (RS256 and RS512 allowed, the issuer given
//! as a string with `:443`, the time injected), on the fixtures of `validate.rs`'s unit tests: the
//! good token and each broken one, claims and signatures. Where the two must differ, the fixture
//! names the CIS2 or OIDC Core rule we apply and `openidconnect`'s verifier does not (or applies
//! differently); everywhere else they must agree.

use cis2_jose::{Alg, JwkSet, SigningKey, b64url};
use cis2_oidc::validate::{Expected, check_claims, unverified_issuer, verify_signature};
use openidconnect::core::{
    CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJwsSigningAlgorithm,
};
use openidconnect::{ClientId, IssuerUrl, Nonce};
use serde_json::{Map, Value, json};

const ISS: &str = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
const CLIENT: &str = "123456789012.apps.national";
const NOW: u64 = 1_800_000_000;
const ACCESS_TOKEN: &str = "the-access-token";

/// How the two must judge a fixture.
enum Verdict {
    /// Both accept, or both refuse.
    Agree,
    /// We judge it otherwise than `openidconnect`'s verifier, by this rule.
    Rule(&'static str),
    /// We judge it otherwise, and `openidconnect` is right: a check we lack, to be closed (then
    /// this fixture becomes `Agree`, and the test says so by failing).
    Gap(&'static str),
}

fn good() -> Map<String, Value> {
    json!({
        "iss": ISS, "sub": "555021935107", "aud": CLIENT,
        "exp": NOW + 600, "iat": NOW - 1, "nonce": "n-1", "auth_time": NOW - 10, "acr": "AAL3_ANY",
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn with(changes: Value) -> Value {
    let mut claims = good();
    for (k, v) in changes.as_object().into_iter().flatten() {
        if v.is_null() {
            claims.remove(k);
        } else {
            claims.insert(k.clone(), v.clone());
        }
    }
    Value::Object(claims)
}

fn expected() -> Expected<'static> {
    Expected {
        issuer: ISS,
        client_id: CLIENT,
        nonce: Some("n-1"),
        max_age: Some(300),
        acr_values: Some("AAL3_ANY"),
        algs: &[Alg::RS256, Alg::RS512],
        access_token: Some(ACCESS_TOKEN),
        now: NOW,
    }
}

fn ours(token: &str, keys: &JwkSet) -> Result<(), String> {
    let expected = expected();
    if let Some(iss) = unverified_issuer(token).filter(|iss| iss != expected.issuer) {
        return Err(format!("WrongIssuer {{ found: {iss:?} }}"));
    }
    let verified = verify_signature(token, expected.algs, keys).map_err(|e| format!("{e:?}"))?;
    check_claims(&verified.claims, verified.alg, &expected).map_err(|e| format!("{e:?}"))
}

fn theirs(token: &str, keys: &JwkSet) -> Result<(), String> {
    let keys = serde_json::to_value(keys).map_err(|e| e.to_string())?;
    let jwks: CoreJsonWebKeySet = serde_json::from_value(keys).map_err(|e| e.to_string())?;
    let now = chrono::DateTime::from_timestamp(NOW as i64, 0).ok_or("time out of range")?;
    let verifier = CoreIdTokenVerifier::new_public_client(
        ClientId::new(CLIENT.into()),
        IssuerUrl::new(ISS.into()).map_err(|e| e.to_string())?,
        jwks,
    )
    .set_allowed_algs([
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    ])
    .set_time_fn(move || now);
    let parsed: CoreIdToken = token.parse().map_err(|e| format!("{e}"))?;
    parsed
        .claims(&verifier, &Nonce::new("n-1".into()))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn our_rules_and_openidconnect_agree_except_where_a_named_rule_says_why() {
    let key = SigningKey::generate(Alg::RS512);
    let keys = JwkSet {
        keys: vec![key.public_jwk()],
    };
    let other_key = SigningKey::generate(Alg::RS512);
    let sign = |claims: Value| key.sign(&claims);
    let unsigned = |header: Value, claims: Value| {
        format!(
            "{}.{}.",
            b64url(header.to_string()),
            b64url(claims.to_string())
        )
    };
    let tampered = {
        let token = sign(with(json!({})));
        let parts: Vec<&str> = token.split('.').collect();
        let claims = b64url(with(json!({"sub": "someone-else"})).to_string());
        format!("{}.{claims}.{}", parts[0], parts[2])
    };
    let several = json!([CLIENT, "other"]);
    let max_age = "max_age: auth_time + max_age must not have passed (Core 3.1.3.7 rule 13)";

    let fixtures: Vec<(&str, String, Result<(), &str>, Verdict)> = vec![
        ("good", sign(with(json!({}))), Ok(()), Verdict::Agree),
        (
            "RS256 by a published key whose JWK says alg RS512",
            key.with_alg(Alg::RS256).sign(&with(json!({}))),
            Ok(()),
            Verdict::Gap(
                "a JWK's alg is not enforced: RFC 7517 4.4 says the key is meant for that \
                 algorithm only (cis2-jose selects the key by kid and checks the token's alg \
                 against the accepted list, not against the key's)",
            ),
        ),
        (
            "iss of another provider",
            sign(with(json!({"iss": "https://evil.example"}))),
            Err("WrongIssuer"),
            Verdict::Agree,
        ),
        (
            "iss without :443",
            sign(with(json!({"iss": ISS.replace(":443", "")}))),
            Err("WrongIssuer"),
            Verdict::Agree,
        ),
        (
            "aud of another client",
            sign(with(json!({"aud": "someone-else"}))),
            Err("WrongAudience"),
            Verdict::Agree,
        ),
        (
            "several audiences, no azp",
            sign(with(json!({"aud": several}))),
            Err("UntrustedAudience"),
            Verdict::Agree,
        ),
        (
            "several audiences, azp names us",
            sign(with(json!({"aud": several, "azp": CLIENT}))),
            Ok(()),
            Verdict::Rule(
                "other audiences are accepted when azp names this client (Core 3.1.3.7 rules \
                 3-5); openidconnect refuses every audience it is not told to trust",
            ),
        ),
        (
            "azp of another client",
            sign(with(json!({"azp": "other"}))),
            Err("WrongAuthorizedParty"),
            Verdict::Rule(
                "azp, when present, must be this client (Core 3.1.3.7 rule 5); openidconnect \
                 looks at azp only when there are several audiences",
            ),
        ),
        (
            "expired",
            sign(with(json!({"exp": NOW - 10}))),
            Err("Expired"),
            Verdict::Agree,
        ),
        (
            "expired 2 s ago",
            sign(with(json!({"exp": NOW - 2}))),
            Ok(()),
            Verdict::Rule("5 s of clock skew on exp and iat (validate::CLOCK_SKEW_SECS)"),
        ),
        (
            "issued in the future",
            sign(with(json!({"iat": NOW + 60}))),
            Err("IssuedInFuture"),
            Verdict::Rule(
                "an iat in the future is refused (Core 3.1.3.7 rule 10 leaves it to the client)",
            ),
        ),
        (
            "no nonce",
            sign(with(json!({"nonce": null}))),
            Err("MissingClaim(\"nonce\")"),
            Verdict::Agree,
        ),
        (
            "another nonce",
            sign(with(json!({"nonce": "other"}))),
            Err("WrongNonce"),
            Verdict::Agree,
        ),
        (
            "no sub",
            sign(with(json!({"sub": null}))),
            Err("MissingClaim(\"sub\")"),
            Verdict::Agree,
        ),
        (
            "authenticated too long ago",
            sign(with(json!({"auth_time": NOW - 400}))),
            Err("AuthTooOld"),
            Verdict::Rule(max_age),
        ),
        (
            "huge exp, auth_time 0",
            sign(with(json!({"exp": u64::MAX, "auth_time": 0u64}))),
            Err("AuthTooOld"),
            // openidconnect refuses it too, earlier: an exp beyond any date it can hold.
            Verdict::Agree,
        ),
        (
            "no auth_time",
            sign(with(json!({"auth_time": null}))),
            Err("MissingClaim(\"auth_time\")"),
            Verdict::Rule("max_age was sent, so auth_time is required (Core 3.1.3.7 rule 13)"),
        ),
        (
            "auth_time in the future",
            sign(with(json!({"auth_time": NOW + 600}))),
            Err("AuthInFuture"),
            Verdict::Rule("an auth_time in the future is refused (a clock check of ours)"),
        ),
        (
            "assurance weaker than asked",
            sign(with(json!({"acr": "AAL2_OR_AAL3_ANY"}))),
            Err("AcrTooWeak"),
            Verdict::Rule(
                "CIS2's acr floor: the weakest AAL asked in acr_values (Core 3.1.3.7 rule 12)",
            ),
        ),
        (
            "no acr",
            sign(with(json!({"acr": null}))),
            Err("MissingClaim(\"acr\")"),
            Verdict::Rule("CIS2's acr floor: acr_values was sent, so acr is required"),
        ),
        (
            "at_hash of another access token",
            sign(with(json!({"at_hash": "AAAA"}))),
            Err("AtHashMismatch"),
            Verdict::Rule(
                "at_hash is checked when present (Core 3.2.2.9); openidconnect's verifier leaves \
                 it to a separate call",
            ),
        ),
        (
            "at_hash of this access token",
            sign(with(json!({"at_hash": Alg::RS512.half_hash(ACCESS_TOKEN)}))),
            Ok(()),
            Verdict::Agree,
        ),
        (
            "signed by a key the provider does not publish",
            other_key.sign(&with(json!({}))),
            Err("UnknownKey"),
            Verdict::Agree,
        ),
        (
            "another provider's token, signed by its own key",
            other_key.sign(&with(json!({"iss": "https://evil.example"}))),
            Err("WrongIssuer"),
            Verdict::Agree,
        ),
        (
            "claims changed after signing",
            tampered,
            Err("BadSignature"),
            Verdict::Agree,
        ),
        (
            "alg none",
            unsigned(json!({"alg": "none"}), with(json!({}))),
            Err("Unsigned"),
            Verdict::Agree,
        ),
        (
            "HS256",
            format!(
                "{}{}",
                unsigned(json!({"alg": "HS256", "kid": key.kid()}), with(json!({}))),
                b64url([7u8; 32])
            ),
            Err("AlgorithmNotAccepted(\"HS256\")"),
            Verdict::Agree,
        ),
    ];

    let mut differences = Vec::new();
    let mut wrong = Vec::new();
    for (name, token, ours_expected, verdict) in &fixtures {
        let ours = ours(token, &keys);
        let theirs = theirs(token, &keys);
        match (ours_expected, &ours) {
            (Ok(()), Ok(())) => {}
            (Err(prefix), Err(got)) if got.starts_with(prefix) => {}
            _ => wrong.push(format!(
                "{name}: we should give {ours_expected:?}, and gave {ours:?}"
            )),
        }
        let alike = ours.is_ok() == theirs.is_ok();
        match verdict {
            Verdict::Agree if !alike => wrong.push(format!(
                "{name}: ours {ours:?}, openidconnect {theirs:?}, and no rule says why"
            )),
            Verdict::Rule(rule) | Verdict::Gap(rule) if alike => wrong.push(format!(
                "{name}: said to differ by \"{rule}\", yet both judged it alike (ours {ours:?}, \
                 openidconnect {theirs:?})"
            )),
            Verdict::Rule(rule) | Verdict::Gap(rule) => differences.push(format!("{name}: {rule}")),
            Verdict::Agree => {}
        }
    }
    // The differences and their rules, with --nocapture.
    println!("{}", differences.join("\n"));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
