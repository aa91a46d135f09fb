//! RFC 8693 token exchange at the NHS API Platform (APIM): the CIS2 ID token of a live session becomes an
//! access token for user-restricted national APIs ("CIS2 separate authentication and authorisation").
//! The client authenticates with an RFC 7523 JWT whose `iss` = `sub` = the application's API key and
//! whose `aud` is the platform's token URL, signed RS512 under the `kid` registered with the platform.
//! Only the relay calls this: the platform key never sits on a desktop.

use crate::exchange::{CLIENT_ASSERTION_TYPE, client_assertion};
use crate::http::{HttpClient, ProviderError};
use crate::secret::Secret;
use cis2_jose::SigningKey;
use serde::Deserialize;
use std::time::{Duration, Instant};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A platform answer whose lifetime is missing or absurd is taken as this long, at most.
const MAX_LIFETIME_SECS: u64 = 24 * 3600;
/// The API Platform documents 599-second access tokens; assumed when it names none.
const DEFAULT_LIFETIME_SECS: u64 = 599;

/// The platform's answer (RFC 8693 §2.2.1). A refresh token, if it gives one, is not kept: the
/// platform's are single-use, and the agent renews by exchanging its session's current ID token again.
#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeAnswer {
    pub access_token: Secret,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub issued_token_type: Option<String>,
}

impl ExchangeAnswer {
    /// Seconds the token lasts, bounded.
    pub fn lifetime(&self) -> u64 {
        self.expires_in
            .unwrap_or(DEFAULT_LIFETIME_SECS)
            .clamp(1, MAX_LIFETIME_SECS)
    }
}

/// The API Platform writes `expires_in` as a string ("599"); RFC 6749 as a number. Both are taken.
fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Seconds>::deserialize(d)? {
        Some(Seconds::Number(n)) => Some(n),
        Some(Seconds::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

/// One registration at the platform's token URL.
pub struct PlatformClient<'a> {
    pub http: &'a HttpClient,
    pub token_url: &'a str,
    pub api_key: &'a str,
    /// RS512, carrying the `kid` registered with the platform.
    pub key: &'a SigningKey,
}

impl PlatformClient<'_> {
    /// Exchanges `id_token`; the answer and how long the platform took.
    pub async fn exchange(
        &self,
        id_token: &Secret,
        now: u64,
    ) -> Result<(ExchangeAnswer, Duration), ProviderError> {
        let assertion = zeroize::Zeroizing::new(client_assertion(
            self.key,
            self.api_key,
            self.token_url,
            now,
        ));
        let form = [
            ("grant_type", GRANT_TYPE),
            ("subject_token", id_token.expose()),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", assertion.as_str()),
        ];
        let request = self
            .http
            .inner()
            .post(self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let sent = Instant::now();
        let answer = self
            .http
            .json("the API Platform's token endpoint", request)
            .await?;
        Ok((answer, sent.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_read_as_the_platform_writes_them_and_bounded() {
        let parse = |body: &str| serde_json::from_str::<ExchangeAnswer>(body).unwrap();
        assert_eq!(
            parse(r#"{"access_token":"a","expires_in":"599"}"#).lifetime(),
            599
        );
        assert_eq!(
            parse(r#"{"access_token":"a","expires_in":60}"#).lifetime(),
            60
        );
        assert_eq!(parse(r#"{"access_token":"a"}"#).lifetime(), 599);
        assert_eq!(
            parse(r#"{"access_token":"a","expires_in":0}"#).lifetime(),
            1
        );
        assert_eq!(
            parse(r#"{"access_token":"a","expires_in":99999999}"#).lifetime(),
            24 * 3600
        );
    }
}
