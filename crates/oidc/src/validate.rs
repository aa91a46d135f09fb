//! ID token validation per OpenID Connect Core 3.1.3.7, with CIS2's additions. Every rule is its own
//! check with its own error, so the agent can say exactly why a sign-in was refused.

use cis2_jose::{Alg, JoseError, JwkSet, UnverifiedJwt};
use serde_json::{Map, Value};

/// Clock skew tolerated on `exp` and `iat`, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 5;

/// What the ID token must match.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// Compared as a string, byte for byte (CIS2's issuer contains `:443`).
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The nonce sent; `None` for a token from a refresh (OIDC Core 12.2: nonce then optional).
    pub nonce: Option<&'a str>,
    pub max_age: Option<u64>,
    /// The `acr_values` asked for, space separated.
    pub acr_values: Option<&'a str>,
    /// The algorithms the provider advertises (and the agent accepts): RS256, RS512, PS256.
    pub algs: &'a [Alg],
    /// The access token that came with it, for `at_hash`.
    pub access_token: Option<&'a str>,
    pub now: u64,
}

/// Why an ID token was refused. None of these carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("{}", self.sentence("ID token"))]
    Malformed(String),
    #[error("{}", self.sentence("ID token"))]
    Unsigned,
    #[error("{}", self.sentence("ID token"))]
    AlgorithmNotAccepted(String),
    #[error("{}", self.sentence("ID token"))]
    UnknownKey(String),
    #[error("{}", self.sentence("ID token"))]
    AmbiguousKey,
    #[error("{}", self.sentence("ID token"))]
    BadSignature,
    #[error("the provider publishes no usable signing key")]
    NoKeys,
    #[error("the ID token was issued by {found:?}, not by the configured issuer {expected:?}")]
    WrongIssuer { expected: String, found: String },
    #[error("the ID token is not for this application (aud does not contain the client_id)")]
    WrongAudience,
    #[error(
        "the ID token is also addressed to other parties and has no azp naming this application"
    )]
    UntrustedAudience,
    #[error("the ID token's azp names another application")]
    WrongAuthorizedParty,
    #[error("the ID token has expired")]
    Expired,
    #[error("the ID token's issue time (iat) is in the future; check this computer's clock")]
    IssuedInFuture,
    #[error("the ID token has no {0} claim")]
    MissingClaim(&'static str),
    #[error("the ID token's nonce does not match the sign-in request (possible replay)")]
    WrongNonce,
    #[error("the authentication is older than max_age ({max_age} seconds) allows")]
    AuthTooOld { max_age: u64 },
    #[error("the authentication time (auth_time) is in the future; check this computer's clock")]
    AuthInFuture,
    #[error("the sign-in used assurance {got:?}, weaker than the {asked:?} this service requires")]
    AcrTooWeak { asked: String, got: String },
    #[error("the ID token's at_hash does not match the access token")]
    AtHashMismatch,
}

impl IdTokenError {
    /// The sentence for a refusal at the signature step, naming which token it was (`"ID token"`,
    /// `"logout token"`: both are checked by [`verify_signature`]). What the token itself said (its
    /// `kid`, `alg`) is quoted with control characters escaped, so it cannot forge a log line.
    pub fn sentence(&self, token: &str) -> String {
        match self {
            IdTokenError::Malformed(why) => {
                format!("the {token} is malformed: {}", why.escape_debug())
            }
            IdTokenError::Unsigned => format!("the {token} is unsigned (alg none)"),
            IdTokenError::AlgorithmNotAccepted(alg) => format!(
                "the {token} is signed with {alg:?}, which is not accepted (HMAC and unlisted algorithms are refused)"
            ),
            IdTokenError::UnknownKey(kid) => {
                format!(
                    "the {token} is signed with key {kid:?}, which the provider does not publish"
                )
            }
            IdTokenError::AmbiguousKey => {
                format!("the {token} names no key and the provider publishes several")
            }
            IdTokenError::BadSignature => format!("the {token}'s signature did not verify"),
            other => other.to_string(),
        }
    }
}

impl From<JoseError> for IdTokenError {
    fn from(err: JoseError) -> Self {
        match err {
            JoseError::Malformed(why) => IdTokenError::Malformed(why.into()),
            JoseError::AlgNone => IdTokenError::Unsigned,
            JoseError::AlgNotAllowed(alg) => IdTokenError::AlgorithmNotAccepted(alg),
            JoseError::UnknownKid(kid) => IdTokenError::UnknownKey(kid),
            JoseError::AmbiguousKey => IdTokenError::AmbiguousKey,
            JoseError::NoKeys => IdTokenError::NoKeys,
            JoseError::BadSignature => IdTokenError::BadSignature,
            JoseError::BadKey(why) => {
                IdTokenError::Malformed(format!("a published key is unusable: {why}"))
            }
            other => IdTokenError::Malformed(other.to_string()),
        }
    }
}

/// The numeric strength of an `acr` value: AAL3_… is 3, AAL2_… (and AAL2_OR_AAL3_ANY) is 2.
pub fn acr_level(acr: &str) -> u8 {
    if acr.starts_with("AAL3") {
        3
    } else if acr.starts_with("AAL2") {
        2
    } else if acr.starts_with("AAL1") {
        1
    } else {
        0
    }
}

/// The `iss` a token claims before its signature is checked: to refuse another provider's token
/// as such before any key is looked up (a clearer reason than "a key the provider does not
/// publish", and no key-set refetch for a foreign token). It may only refuse: acceptance waits for
/// the signature, and [`check_claims`] compares `iss` again on the verified claims. `None` when the
/// token does not parse or names no issuer (the signature step then says why).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let parsed = UnverifiedJwt::parse(token).ok()?;
    parsed.claims.get("iss")?.as_str().map(str::to_owned)
}

/// The signature step alone: the claims if the token is signed by one of `keys` with an accepted alg.
pub fn verify_signature(
    token: &str,
    algs: &[Alg],
    keys: &JwkSet,
) -> Result<Verified, IdTokenError> {
    let parsed = UnverifiedJwt::parse(token)?;
    let alg = parsed.checked_alg(algs)?;
    let key = parsed.select_key(keys)?;
    parsed.verify_with(alg, key)?;
    Ok(Verified {
        alg,
        claims: parsed.claims,
    })
}

/// An ID token whose signature held: its algorithm (for `at_hash`) and claims.
#[derive(Debug, Clone)]
pub struct Verified {
    pub alg: Alg,
    pub claims: Map<String, Value>,
}

/// Checks the claims of a signature-verified ID token.
pub fn check_claims(
    claims: &Map<String, Value>,
    alg: Alg,
    expected: &Expected<'_>,
) -> Result<(), IdTokenError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let number = |name: &str| claims.get(name).and_then(Value::as_u64);

    let iss = text("iss").ok_or(IdTokenError::MissingClaim("iss"))?;
    if iss != expected.issuer {
        return Err(IdTokenError::WrongIssuer {
            expected: expected.issuer.into(),
            found: iss.into(),
        });
    }
    if text("sub").is_none_or(str::is_empty) {
        return Err(IdTokenError::MissingClaim("sub"));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => return Err(IdTokenError::MissingClaim("aud")),
    };
    if !audiences.contains(&expected.client_id) {
        return Err(IdTokenError::WrongAudience);
    }
    match text("azp") {
        Some(azp) if azp != expected.client_id => return Err(IdTokenError::WrongAuthorizedParty),
        None if audiences.len() > 1 => return Err(IdTokenError::UntrustedAudience),
        _ => {}
    }
    let exp = number("exp").ok_or(IdTokenError::MissingClaim("exp"))?;
    if expected.now >= exp.saturating_add(CLOCK_SKEW_SECS) {
        return Err(IdTokenError::Expired);
    }
    let iat = number("iat").ok_or(IdTokenError::MissingClaim("iat"))?;
    if iat > expected.now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(IdTokenError::IssuedInFuture);
    }
    if let Some(nonce) = expected.nonce {
        match text("nonce") {
            None => return Err(IdTokenError::MissingClaim("nonce")),
            Some(found) if found != nonce => return Err(IdTokenError::WrongNonce),
            Some(_) => {}
        }
    }
    if let Some(max_age) = expected.max_age {
        let auth_time = number("auth_time").ok_or(IdTokenError::MissingClaim("auth_time"))?;
        if auth_time > expected.now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(IdTokenError::AuthInFuture);
        }
        if expected.now
            > auth_time
                .saturating_add(max_age)
                .saturating_add(CLOCK_SKEW_SECS)
        {
            return Err(IdTokenError::AuthTooOld { max_age });
        }
    }
    if let Some(asked) = expected.acr_values.filter(|a| !a.trim().is_empty()) {
        // The weakest value asked is the floor (the provider may satisfy any of them).
        // Values the agent does not know are not a floor of 0: they are left out.
        let floor = asked
            .split_whitespace()
            .map(acr_level)
            .filter(|level| *level > 0)
            .min()
            .unwrap_or(0);
        let got = text("acr").ok_or(IdTokenError::MissingClaim("acr"))?;
        if acr_level(got) < floor {
            return Err(IdTokenError::AcrTooWeak {
                asked: asked.into(),
                got: got.into(),
            });
        }
    }
    if let (Some(at_hash), Some(access_token)) = (text("at_hash"), expected.access_token)
        && alg.half_hash(access_token) != at_hash
    {
        return Err(IdTokenError::AtHashMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis2_jose::SigningKey;
    use serde_json::json;

    const ISS: &str = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
    const NOW: u64 = 1_800_000_000;

    fn expected() -> Expected<'static> {
        Expected {
            issuer: ISS,
            client_id: "123456789012.apps.national",
            nonce: Some("n-1"),
            max_age: Some(300),
            acr_values: Some("AAL3_ANY"),
            algs: &[Alg::RS256],
            access_token: None,
            now: NOW,
        }
    }

    fn good() -> Map<String, Value> {
        json!({
            "iss": ISS, "sub": "555021935107", "aud": "123456789012.apps.national",
            "exp": NOW + 600, "iat": NOW - 1, "nonce": "n-1", "auth_time": NOW - 10, "acr": "AAL3_ANY",
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn with(changes: Value) -> Map<String, Value> {
        let mut claims = good();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                claims.remove(k);
            } else {
                claims.insert(k.clone(), v.clone());
            }
        }
        claims
    }

    #[test]
    fn a_good_token_passes() {
        assert_eq!(check_claims(&good(), Alg::RS256, &expected()), Ok(()));
    }

    #[test]
    fn each_claim_rule_has_its_own_error() {
        let cases = [
            (json!({"iss": "https://evil.example"}), "WrongIssuer"),
            (json!({"iss": ISS.replace(":443", "")}), "WrongIssuer"),
            (json!({"aud": "someone-else"}), "WrongAudience"),
            (
                json!({"aud": ["123456789012.apps.national", "other"]}),
                "UntrustedAudience",
            ),
            (json!({"azp": "other"}), "WrongAuthorizedParty"),
            (json!({"exp": NOW - 10}), "Expired"),
            (json!({"iat": NOW + 60}), "IssuedInFuture"),
            (json!({"nonce": null}), "MissingClaim(\"nonce\")"),
            (json!({"nonce": "other"}), "WrongNonce"),
            (json!({"auth_time": NOW - 400}), "AuthTooOld"),
            (json!({"auth_time": null}), "MissingClaim(\"auth_time\")"),
            (json!({"acr": "AAL2_OR_AAL3_ANY"}), "AcrTooWeak"),
            (json!({"sub": null}), "MissingClaim(\"sub\")"),
        ];
        for (change, error) in cases {
            let err = check_claims(&with(change.clone()), Alg::RS256, &expected()).unwrap_err();
            assert!(
                format!("{err:?}").starts_with(error),
                "{change}: got {err:?}"
            );
        }
    }

    #[test]
    fn an_auth_time_in_the_future_and_huge_numbers_are_refused_without_overflow() {
        assert_eq!(
            check_claims(
                &with(json!({"auth_time": NOW + 600})),
                Alg::RS256,
                &expected()
            ),
            Err(IdTokenError::AuthInFuture)
        );
        let huge = with(json!({"exp": u64::MAX, "auth_time": 0u64}));
        assert_eq!(
            check_claims(&huge, Alg::RS256, &expected()),
            Err(IdTokenError::AuthTooOld { max_age: 300 })
        );
    }

    #[test]
    fn an_unknown_acr_value_does_not_lower_the_floor() {
        let mut exp = expected();
        exp.acr_values = Some("SOMETHING_NEW AAL3_ANY");
        assert!(matches!(
            check_claims(&with(json!({"acr": "AAL2_ANY"})), Alg::RS256, &exp),
            Err(IdTokenError::AcrTooWeak { .. })
        ));
    }

    #[test]
    fn skew_of_a_few_seconds_is_tolerated() {
        assert_eq!(
            check_claims(
                &with(json!({"iat": NOW + 3, "exp": NOW - 2})),
                Alg::RS256,
                &expected()
            ),
            Ok(())
        );
        let several = with(
            json!({"aud": ["123456789012.apps.national", "other"], "azp": "123456789012.apps.national"}),
        );
        assert_eq!(check_claims(&several, Alg::RS256, &expected()), Ok(()));
    }

    #[test]
    fn acr_floor_is_the_weakest_value_asked() {
        let mut exp = expected();
        exp.acr_values = Some("AAL2_OR_AAL3_ANY");
        assert_eq!(
            check_claims(&with(json!({"acr": "AAL2_OR_AAL3_ANY"})), Alg::RS256, &exp),
            Ok(())
        );
        assert_eq!(
            check_claims(&with(json!({"acr": "AAL3_ANY"})), Alg::RS256, &exp),
            Ok(())
        );
        assert!(check_claims(&with(json!({"acr": "AAL1_USERPASS"})), Alg::RS256, &exp).is_err());
    }

    #[test]
    fn signature_rules() {
        let key = SigningKey::generate(Alg::RS256);
        let keys = JwkSet {
            keys: vec![key.public_jwk()],
        };
        let token = key.sign(&Value::Object(good()));
        assert!(verify_signature(&token, &[Alg::RS256], &keys).is_ok());
        assert_eq!(
            verify_signature(&token, &[Alg::RS512], &keys).unwrap_err(),
            IdTokenError::AlgorithmNotAccepted("RS256".into())
        );
        let other = SigningKey::generate(Alg::RS256);
        assert!(matches!(
            verify_signature(&other.sign(&json!({})), &[Alg::RS256], &keys),
            Err(IdTokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn the_unverified_issuer_is_read_only_from_a_token_that_parses() {
        let other = SigningKey::generate(Alg::RS256);
        let token = other.sign(&json!({"iss": "https://evil.example"}));
        assert_eq!(
            unverified_issuer(&token).as_deref(),
            Some("https://evil.example")
        );
        assert_eq!(unverified_issuer(&other.sign(&json!({"sub": "a"}))), None);
        assert_eq!(unverified_issuer(&other.sign(&json!({"iss": 5}))), None);
        assert_eq!(unverified_issuer("not.a-token"), None);
    }

    #[test]
    fn at_hash_is_checked_when_present() {
        let mut exp = expected();
        exp.access_token = Some("the-access-token");
        let good_hash = Alg::RS256.half_hash("the-access-token");
        assert_eq!(
            check_claims(&with(json!({"at_hash": good_hash})), Alg::RS256, &exp),
            Ok(())
        );
        assert_eq!(
            check_claims(&with(json!({"at_hash": "AAAA"})), Alg::RS256, &exp),
            Err(IdTokenError::AtHashMismatch)
        );
    }
}
