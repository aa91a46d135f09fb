//! Swapping a code (or a refresh token) for tokens at the token endpoint, with the client
//! authentication the registration asks for: `private_key_jwt` (the CIS2 way: RS512 or RS256, `kid` =
//! RFC 7638 thumbprint, `aud` = the token endpoint exactly as discovered, a unique `jti`, `exp` ≤ 5 min),
//! `client_secret_post`, or `none` (public client, PKCE only). The relay, where the vendor's server holds
//! the key, sits behind the same [`TokenResponse`].

use crate::http::{HttpClient, ProviderError};
use crate::secret::Secret;
use cis2_jose::{SigningKey, random_token};
use serde::Deserialize;
use serde_json::json;

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid: well inside CIS2's five minutes.
pub const ASSERTION_LIFETIME_SECS: u64 = 120;

/// How the agent proves who it is at the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    None,
    SecretPost(Secret),
    PrivateKeyJwt(Box<SigningKey>),
}

impl ClientAuth {
    pub fn method_name(&self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::SecretPost(_) => "client_secret_post",
            ClientAuth::PrivateKeyJwt(_) => "private_key_jwt",
        }
    }
}

/// The token endpoint's answer (RFC 6749 §5.1).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: Secret,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    #[serde(default)]
    pub id_token: Option<Secret>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// The signed client assertion for `client_id` at `token_endpoint`.
pub fn client_assertion(
    key: &SigningKey,
    client_id: &str,
    token_endpoint: &str,
    now: u64,
) -> String {
    key.sign(&json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "jti": random_token(24),
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    }))
}

impl ClientAuth {
    /// The form fields that name and authenticate this client at `endpoint` (the token endpoint's
    /// URL is also the client assertion's audience for revocation).
    pub fn form_fields(
        &self,
        client_id: &str,
        endpoint: &str,
        now: u64,
    ) -> Vec<(&'static str, String)> {
        let mut fields = vec![("client_id", client_id.to_string())];
        match self {
            ClientAuth::None => {}
            ClientAuth::SecretPost(secret) => {
                fields.push(("client_secret", secret.expose().into()))
            }
            ClientAuth::PrivateKeyJwt(key) => {
                fields.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.into()));
                fields.push((
                    "client_assertion",
                    client_assertion(key, client_id, endpoint, now),
                ));
            }
        }
        fields
    }
}

pub struct TokenEndpoint<'a> {
    pub http: &'a HttpClient,
    pub url: &'a str,
    pub client_id: &'a str,
    pub auth: &'a ClientAuth,
    pub now: u64,
}

impl TokenEndpoint<'_> {
    /// The tokens, and how long the provider took to answer (the agent's own work, such as signing the
    /// client assertion, is not in it).
    pub async fn exchange_code(
        &self,
        code: &Secret,
        code_verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<(TokenResponse, std::time::Duration), ProviderError> {
        self.post(vec![
            ("grant_type", "authorization_code".into()),
            ("code", code.expose().into()),
            ("redirect_uri", redirect_uri.into()),
            ("code_verifier", code_verifier.expose().into()),
        ])
        .await
    }

    pub async fn refresh(
        &self,
        refresh_token: &Secret,
    ) -> Result<(TokenResponse, std::time::Duration), ProviderError> {
        self.post(vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh_token.expose().into()),
        ])
        .await
    }

    async fn post(
        &self,
        mut form: Vec<(&str, String)>,
    ) -> Result<(TokenResponse, std::time::Duration), ProviderError> {
        form.extend(self.auth.form_fields(self.client_id, self.url, self.now));
        let request = self
            .http
            .inner()
            .post(self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        // The form holds secrets: clear our copies as soon as it is encoded.
        drop(zeroize::Zeroizing::new(
            form.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        ));
        let sent = std::time::Instant::now();
        let tokens = self
            .http
            .json("the provider's token endpoint", request)
            .await?;
        Ok((tokens, sent.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis2_jose::{Alg, JwkSet, UnverifiedJwt};

    #[test]
    fn the_assertion_is_what_cis2_checks() {
        let key = SigningKey::generate(Alg::RS512);
        let endpoint = "https://am.example:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare/access_token";
        let jwt = client_assertion(&key, "123456789012.apps.national", endpoint, 1_000_000);
        let parsed = UnverifiedJwt::parse(&jwt).unwrap();
        assert_eq!(parsed.alg(), Some("RS512"));
        assert_eq!(parsed.kid(), key.public_jwk().thumbprint().as_deref());
        let claims = parsed
            .verify(
                &[Alg::RS512],
                &JwkSet {
                    keys: vec![key.public_jwk()],
                },
            )
            .unwrap();
        assert_eq!(claims["iss"], "123456789012.apps.national");
        assert_eq!(claims["sub"], "123456789012.apps.national");
        assert_eq!(claims["aud"], endpoint, "aud keeps :443 byte for byte");
        assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 300);
        let other = client_assertion(&key, "x", endpoint, 1_000_000);
        assert_ne!(
            UnverifiedJwt::parse(&other).unwrap().claims["jti"],
            claims["jti"]
        );
    }
}
