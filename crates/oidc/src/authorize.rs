//! The authorization request: PKCE S256 (RFC 7636), a fresh `state` and `nonce`, and the parameters
//! CIS2 takes. The URL is the discovered endpoint byte for byte, with the query appended.

use crate::secret::Secret;
use cis2_jose::{random_token, sha256_b64url};

/// What the agent asks for.
#[derive(Debug, Clone)]
pub struct AuthParams<'a> {
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub scopes: &'a [String],
    pub acr_values: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub max_age: Option<u64>,
}

/// A request in flight: the URL for the browser and what the callback and token must match.
#[derive(Debug)]
pub struct AuthRequest {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub code_verifier: Secret,
}

pub fn build(authorization_endpoint: &str, params: &AuthParams<'_>) -> AuthRequest {
    // 32 random bytes → a 43-character verifier, the RFC 7636 minimum length and full entropy.
    let code_verifier = random_token(32);
    let state = random_token(24);
    let nonce = random_token(24);
    let challenge = sha256_b64url(&code_verifier);
    let scope = params.scopes.join(" ");
    let max_age = params.max_age.map(|m| m.to_string());
    let mut pairs: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", params.client_id),
        ("redirect_uri", params.redirect_uri),
        ("scope", &scope),
        ("state", &state),
        ("nonce", &nonce),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ];
    if let Some(acr) = params.acr_values {
        pairs.push(("acr_values", acr));
    }
    if let Some(prompt) = params.prompt {
        pairs.push(("prompt", prompt));
    }
    if let Some(max_age) = &max_age {
        pairs.push(("max_age", max_age));
    }
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let separator = if authorization_endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    AuthRequest {
        url: format!("{authorization_endpoint}{separator}{query}"),
        state,
        nonce,
        code_verifier: Secret::new(code_verifier),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_carries_pkce_state_nonce_and_cis2_parameters() {
        let scopes = vec!["openid".to_string(), "selectedrole".to_string()];
        let endpoint = "https://am.example:443/openam/oauth2/realms/root/authorize";
        let request = build(
            endpoint,
            &AuthParams {
                client_id: "123456789012.apps.national",
                redirect_uri: "http://127.0.0.1:5000/callback",
                scopes: &scopes,
                acr_values: Some("AAL3_ANY"),
                prompt: Some("login"),
                max_age: Some(300),
            },
        );
        assert!(
            request.url.starts_with(&format!("{endpoint}?")),
            "the endpoint is kept byte for byte"
        );
        let query: std::collections::HashMap<_, _> = url::Url::parse(&request.url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        assert_eq!(
            query["code_challenge"],
            sha256_b64url(request.code_verifier.expose())
        );
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(query["state"], request.state);
        assert_eq!(query["nonce"], request.nonce);
        assert_eq!(query["scope"], "openid selectedrole");
        assert_eq!(query["acr_values"], "AAL3_ANY");
        assert_eq!(query["prompt"], "login");
        assert_eq!(query["max_age"], "300");
        assert_eq!(request.code_verifier.expose().len(), 43);
        let again = build(
            endpoint,
            &AuthParams {
                client_id: "x",
                redirect_uri: "y",
                scopes: &scopes,
                acr_values: None,
                prompt: None,
                max_age: None,
            },
        );
        assert_ne!(again.state, request.state);
        assert_ne!(again.nonce, request.nonce);
        assert!(!again.url.contains("acr_values") && !again.url.contains("prompt"));
    }
}
