//! Back-channel logout tokens (OpenID Connect Back-Channel Logout 1.0 §2.4 and §2.6): CIS2 POSTs one to
//! the vendor's relay when a session ends there. The signature is checked with the same code and keys as
//! an ID token; then the claims that make it a logout token and not something else.

use crate::validate::{CLOCK_SKEW_SECS, IdTokenError, unverified_issuer, verify_signature};
use cis2_jose::{Alg, JwkSet};
use serde_json::{Map, Value};

pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How old a logout token may be (by `iat`) and still be acted on.
pub const MAX_LOGOUT_TOKEN_AGE_SECS: u64 = 300;

/// Whose session ended: at least one of the two is present.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndedSession {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// Why a logout token was refused. None of these carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogoutTokenError {
    #[error("{}", .0.sentence("logout token"))]
    Signature(IdTokenError),
    #[error("the logout token was issued by {found:?}, not by {expected:?}")]
    WrongIssuer { expected: String, found: String },
    #[error("the logout token is not addressed to this client (aud)")]
    WrongAudience,
    #[error("the logout token has no {0} claim")]
    MissingClaim(&'static str),
    #[error(
        "the logout token is older than {MAX_LOGOUT_TOKEN_AGE_SECS} seconds or from the future (iat)"
    )]
    Stale,
    #[error("the logout token has expired")]
    Expired,
    #[error("the logout token has neither sid nor sub")]
    NoSubject,
    #[error("the logout token's events claim has no back-channel logout member")]
    NotALogoutEvent,
    #[error("the logout token carries a nonce, which logout tokens must not (is it an ID token?)")]
    HasNonce,
}

pub struct LogoutExpected<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub algs: &'a [Alg],
    pub now: u64,
}

/// Verifies the signature with `keys` and checks the claims. `Err(Signature(UnknownKey))` tells the
/// caller to fetch the provider's keys again and retry once.
pub fn validate_logout_token(
    token: &str,
    keys: &JwkSet,
    expected: &LogoutExpected<'_>,
) -> Result<EndedSession, LogoutTokenError> {
    // Another provider's token is refused before its key is looked for (no refetch for it).
    if let Some(found) = unverified_issuer(token).filter(|iss| iss != expected.issuer) {
        let expected = expected.issuer.to_owned();
        return Err(LogoutTokenError::WrongIssuer { expected, found });
    }
    let verified =
        verify_signature(token, expected.algs, keys).map_err(LogoutTokenError::Signature)?;
    check_logout_claims(&verified.claims, expected)
}

pub fn check_logout_claims(
    claims: &Map<String, Value>,
    expected: &LogoutExpected<'_>,
) -> Result<EndedSession, LogoutTokenError> {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let iss = text("iss").ok_or(LogoutTokenError::MissingClaim("iss"))?;
    if iss != expected.issuer {
        return Err(LogoutTokenError::WrongIssuer {
            expected: expected.issuer.into(),
            found: iss,
        });
    }
    let addressed = match claims.get("aud") {
        Some(Value::String(aud)) => aud == expected.client_id,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected.client_id)),
        _ => return Err(LogoutTokenError::MissingClaim("aud")),
    };
    if !addressed {
        return Err(LogoutTokenError::WrongAudience);
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_u64)
        .ok_or(LogoutTokenError::MissingClaim("iat"))?;
    if iat > expected.now.saturating_add(CLOCK_SKEW_SECS)
        || expected.now > iat.saturating_add(MAX_LOGOUT_TOKEN_AGE_SECS)
    {
        return Err(LogoutTokenError::Stale);
    }
    if let Some(exp) = claims.get("exp")
        && exp
            .as_u64()
            .is_none_or(|exp| expected.now >= exp.saturating_add(CLOCK_SKEW_SECS))
    {
        return Err(LogoutTokenError::Expired);
    }
    let is_logout = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|events| events.get(BACKCHANNEL_LOGOUT_EVENT))
        .is_some_and(Value::is_object);
    if !is_logout {
        return Err(LogoutTokenError::NotALogoutEvent);
    }
    if claims.contains_key("nonce") {
        return Err(LogoutTokenError::HasNonce);
    }
    // REQUIRED by §2.4: without it a replay cannot be told from a new logout.
    if text("jti").is_none() {
        return Err(LogoutTokenError::MissingClaim("jti"));
    }
    let ended = EndedSession {
        sid: text("sid"),
        sub: text("sub"),
    };
    if ended.sid.is_none() && ended.sub.is_none() {
        return Err(LogoutTokenError::NoSubject);
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis2_jose::SigningKey;
    use serde_json::json;

    const ISSUER: &str = "https://cis2.example:443/realms/Healthcare";
    const CLIENT: &str = "123.apps.national";
    const NOW: u64 = 1_800_000_000;

    fn expected() -> LogoutExpected<'static> {
        LogoutExpected {
            issuer: ISSUER,
            client_id: CLIENT,
            algs: &[Alg::RS256, Alg::RS512],
            now: NOW,
        }
    }

    fn good() -> Map<String, Value> {
        json!({
            "iss": ISSUER, "aud": CLIENT, "iat": NOW - 5, "jti": "j-1", "sub": "u-1", "sid": "s-1",
            "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
        })
        .as_object()
        .cloned()
        .unwrap()
    }

    #[test]
    fn a_good_token_names_the_session() {
        let ended = check_logout_claims(&good(), &expected()).unwrap();
        assert_eq!(ended.sid.as_deref(), Some("s-1"));
        assert_eq!(ended.sub.as_deref(), Some("u-1"));
    }

    #[test]
    fn each_defect_is_refused_with_its_reason() {
        let cases: Vec<(Value, LogoutTokenError)> = vec![
            (
                json!({"iss": "https://other:443/"}),
                LogoutTokenError::WrongIssuer {
                    expected: ISSUER.into(),
                    found: "https://other:443/".into(),
                },
            ),
            (json!({"iss": null}), LogoutTokenError::MissingClaim("iss")),
            (
                json!({"aud": "someone-else"}),
                LogoutTokenError::WrongAudience,
            ),
            (json!({"aud": ["a", "b"]}), LogoutTokenError::WrongAudience),
            (json!({"aud": null}), LogoutTokenError::MissingClaim("aud")),
            (json!({"iat": null}), LogoutTokenError::MissingClaim("iat")),
            (
                json!({"iat": NOW - MAX_LOGOUT_TOKEN_AGE_SECS - 1}),
                LogoutTokenError::Stale,
            ),
            (json!({"iat": NOW + 3600}), LogoutTokenError::Stale),
            (json!({"exp": NOW - 3600}), LogoutTokenError::Expired),
            (json!({"events": null}), LogoutTokenError::NotALogoutEvent),
            (
                json!({"events": {"http://example/other": {}}}),
                LogoutTokenError::NotALogoutEvent,
            ),
            (
                json!({"events": {BACKCHANNEL_LOGOUT_EVENT: "yes"}}),
                LogoutTokenError::NotALogoutEvent,
            ),
            (json!({"nonce": "n"}), LogoutTokenError::HasNonce),
            (
                json!({"sid": null, "sub": null}),
                LogoutTokenError::NoSubject,
            ),
            (json!({"sid": "", "sub": ""}), LogoutTokenError::NoSubject),
            (json!({"jti": null}), LogoutTokenError::MissingClaim("jti")),
        ];
        for (change, why) in cases {
            let mut claims = good();
            for (name, value) in change.as_object().unwrap() {
                if value.is_null() {
                    claims.remove(name);
                } else {
                    claims.insert(name.clone(), value.clone());
                }
            }
            assert_eq!(
                check_logout_claims(&claims, &expected()),
                Err(why.clone()),
                "{change}"
            );
        }
    }

    #[test]
    fn only_sid_or_only_sub_is_enough_and_aud_may_be_a_list() {
        let mut claims = good();
        claims.remove("sub");
        claims.insert("aud".into(), json!(["x", CLIENT]));
        assert!(check_logout_claims(&claims, &expected()).is_ok());
        let mut claims = good();
        claims.remove("sid");
        assert!(check_logout_claims(&claims, &expected()).is_ok());
    }

    #[test]
    fn the_signature_is_checked_with_the_id_token_rules() {
        let key = SigningKey::generate(Alg::RS256);
        let other = SigningKey::generate(Alg::RS256);
        let keys = JwkSet {
            keys: vec![key.public_jwk()],
        };
        let token = key.sign(&Value::Object(good()));
        assert!(validate_logout_token(&token, &keys, &expected()).is_ok());
        let forged = other.sign(&Value::Object(good()));
        assert!(matches!(
            validate_logout_token(&forged, &keys, &expected()),
            Err(LogoutTokenError::Signature(_))
        ));
        // Another provider's token is refused by its issuer before its unknown key is looked for
        // (which would make the relay fetch the keys again); forged with our issuer, by the key.
        let mut foreign = good();
        foreign.insert("iss".into(), json!("https://other:443/"));
        assert_eq!(
            validate_logout_token(&other.sign(&Value::Object(foreign)), &keys, &expected()),
            Err(LogoutTokenError::WrongIssuer {
                expected: ISSUER.into(),
                found: "https://other:443/".into()
            })
        );
        let unsigned = format!(
            "{}.{}.",
            cis2_jose::b64url(br#"{"alg":"none"}"#),
            cis2_jose::b64url(Value::Object(good()).to_string().as_bytes())
        );
        assert_eq!(
            validate_logout_token(&unsigned, &keys, &expected()),
            Err(LogoutTokenError::Signature(IdTokenError::Unsigned))
        );
    }
}
