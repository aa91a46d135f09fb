//! The relying party: one whole sign-in (discovery → authorize → loopback callback → code exchange →
//! ID token validation → userinfo → the CIS2 user) and a refresh, each ending in a [`SignedIn`] or a
//! [`SignInError`] that says which step failed and why.

use super::authorize::{self, AuthParams};
use super::claims::User;
use super::discovery::{Discovery, DiscoveryError, ProviderMetadata};
use super::exchange::{ClientAuth, TokenEndpoint, TokenResponse};
use super::loopback::{CallbackError, LoopbackListener};
use super::relay::{RelayClient, RelayTokens};
use super::validate::{self, Expected, IdTokenError};
use crate::browser::Browser;
use crate::clock::SharedClock;
use crate::http::{ProviderError, Unreached};
use crate::secret::Secret;
use cis2_jose::Alg;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// How a code (or a refresh token) becomes tokens.
#[derive(Debug, Clone)]
pub enum Exchange {
    /// This program calls the token endpoint itself, authenticating as the client.
    Direct(ClientAuth),
    /// The vendor's `cis2-relay` holds the client key and calls the token endpoint (CIS2 production).
    Relay(RelayClient),
}

/// The client registration and what to ask for.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub client_id: String,
    pub exchange: Exchange,
    pub scopes: Vec<String>,
    pub acr_values: Option<String>,
    pub prompt: Option<String>,
    pub max_age: Option<u64>,
    pub redirect_ports: Vec<u16>,
    pub login_timeout: Duration,
}

/// A validated sign-in or refresh.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub user: User,
    pub sub: String,
    pub sid: Option<String>,
    pub access_token: Secret,
    pub expires_at: u64,
    pub refresh_token: Option<Secret>,
    pub id_token: Secret,
    /// With the relay: what opens its logout event stream for this session.
    pub events_ticket: Option<Secret>,
    /// From the callback's arrival to here: the agent's own share of a sign-in (benchmarks report it).
    pub callback_to_done: Option<Duration>,
    /// Of that, how long the provider took to answer the token and userinfo calls.
    pub provider_time: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignInError {
    #[error("{0}")]
    Discovery(#[from] DiscoveryError),
    #[error("{0}")]
    Callback(#[from] CallbackError),
    #[error("{0}")]
    Browser(String),
    #[error("the token request failed: {0}")]
    Exchange(ProviderError),
    #[error("the provider gave no ID token (is `openid` in the scopes?)")]
    NoIdToken,
    #[error("{0}")]
    IdToken(#[from] IdTokenError),
    #[error("userinfo failed: {0}")]
    Userinfo(ProviderError),
    #[error("userinfo is about another person (its sub differs from the ID token's)")]
    UserinfoSubjectMismatch,
    #[error("the refreshed tokens are for another person (sub changed)")]
    SubjectChanged,
    #[error("the relay's answer is about another person than its ID token")]
    RelaySubjectMismatch,
    /// The provider's answer (an `invalid_grant`), kept whole for its status and OAuth error.
    #[error("the provider refused the refresh token: the session has ended there ({0})")]
    RefreshRefused(ProviderError),
}

impl SignInError {
    /// True when the provider could not be reached or answered garbage: the session should stay as it was.
    pub fn is_outage(&self) -> bool {
        match self {
            SignInError::Discovery(e) => e.is_outage(),
            SignInError::Exchange(e) | SignInError::Userinfo(e) => e.is_outage(),
            _ => false,
        }
    }
}

/// A provider's `expires_in` beyond this is treated as this (a garbage value must not overflow).
const MAX_TOKEN_LIFETIME_SECS: u64 = 7 * 24 * 3600;

pub struct RelyingParty {
    pub discovery: Discovery,
    pub settings: ClientSettings,
    pub clock: SharedClock,
}

/// The person: the ID token's `sub`, else the session being renewed's (empty when neither).
fn subject(claims: &Map<String, Value>, previous: Option<&SignedIn>) -> String {
    match claims.get("sub").and_then(Value::as_str) {
        Some(sub) => sub.to_string(),
        None => previous.map(|p| p.sub.clone()).unwrap_or_default(),
    }
}

/// The CIS2 session: the ID token's `sid`, else the session being renewed's.
fn session_id(claims: &Map<String, Value>, previous: Option<&SignedIn>) -> Option<String> {
    claims
        .get("sid")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| previous.and_then(|p| p.sid.clone()))
}

/// A refresh without a new ID token: assurance and role choice stay the sign-in's.
fn keep_sign_in_choices(user: &mut User, previous: Option<&SignedIn>) {
    let Some(previous) = previous else { return };
    user.assurance = previous.user.assurance.clone();
    let chosen = previous.user.selected_role.as_ref().map(|r| r.id.as_str());
    user.selected_role = user
        .roles
        .iter()
        .find(|r| Some(r.id.as_str()) == chosen)
        .cloned();
}

pub fn accepted_algs(metadata: &ProviderMetadata) -> Vec<Alg> {
    match &metadata.id_token_signing_alg_values_supported {
        Some(list) => {
            let algs: Vec<Alg> = list.iter().filter_map(|a| Alg::parse(a)).collect();
            if algs.is_empty() {
                vec![Alg::RS256]
            } else {
                algs
            }
        }
        None => vec![Alg::RS256],
    }
}

impl RelyingParty {
    pub fn issuer(&self) -> &str {
        self.discovery.issuer()
    }

    fn token_endpoint<'a>(
        &'a self,
        metadata: &'a ProviderMetadata,
        auth: &'a ClientAuth,
    ) -> TokenEndpoint<'a> {
        TokenEndpoint {
            http: self.discovery.http(),
            url: &metadata.token_endpoint,
            client_id: &self.settings.client_id,
            auth,
            now: self.clock.now(),
        }
    }

    /// One whole sign-in through the browser. `prompt`/`scopes` may be overridden (role change).
    pub async fn sign_in(
        &self,
        browser: &Browser,
        timeout: Option<Duration>,
        extra_scopes: &[&str],
        drop_scopes: &[&str],
    ) -> Result<SignedIn, SignInError> {
        let metadata = self.discovery.metadata().await?;
        let listener = LoopbackListener::bind(&self.settings.redirect_ports).await?;
        let redirect_uri = listener.redirect_uri();
        let mut scopes: Vec<String> = self
            .settings
            .scopes
            .iter()
            .filter(|s| !drop_scopes.contains(&s.as_str()))
            .cloned()
            .collect();
        for extra in extra_scopes {
            if !scopes.iter().any(|s| s == extra) {
                scopes.push(extra.to_string());
            }
        }
        let request = authorize::build(
            &metadata.authorization_endpoint,
            &AuthParams {
                client_id: &self.settings.client_id,
                redirect_uri: &redirect_uri,
                scopes: &scopes,
                acr_values: self.settings.acr_values.as_deref(),
                prompt: self.settings.prompt.as_deref(),
                max_age: self.settings.max_age,
            },
        );
        // The browser is sent to the listener's one-time start URL, never straight to the authorize
        // URL: the sign-in is bound to that browser (see `loopback`), and the state, nonce and
        // challenge stay out of the browser's command line.
        let _opened = browser
            .open(&listener.start_url())
            .map_err(SignInError::Browser)?;
        let callback = listener
            .wait(
                &request.url,
                &request.state,
                self.issuer(),
                timeout.unwrap_or(self.settings.login_timeout),
            )
            .await?;
        let mut signed_in = self
            .redeem_code(
                &metadata,
                &callback.code,
                &request.code_verifier,
                &redirect_uri,
                Some(&request.nonce),
            )
            .await?;
        signed_in.callback_to_done = Some(callback.received_at.elapsed());
        Ok(signed_in)
    }

    /// A code from the provider's redirect → validated tokens and the user. `nonce` is `None` only in the
    /// relay, which never sees the authorization request (the agent checks the nonce on its side).
    pub async fn redeem_code(
        &self,
        metadata: &ProviderMetadata,
        code: &Secret,
        code_verifier: &Secret,
        redirect_uri: &str,
        nonce: Option<&str>,
    ) -> Result<SignedIn, SignInError> {
        match &self.settings.exchange {
            Exchange::Direct(auth) => {
                let (tokens, mut provider_time) = self
                    .token_endpoint(metadata, auth)
                    .exchange_code(code, code_verifier, redirect_uri)
                    .await
                    .map_err(SignInError::Exchange)?;
                self.finish(metadata, tokens, nonce, None, false, &mut provider_time)
                    .await
            }
            Exchange::Relay(relay) => {
                let (answer, relay_time) = relay
                    .token(code, code_verifier, redirect_uri)
                    .await
                    .map_err(SignInError::Exchange)?;
                self.check_relay_answer(metadata, answer, nonce, None, relay_time)
                    .await
            }
        }
    }

    /// Renews with the refresh token. The person must stay the same.
    pub async fn refresh(
        &self,
        refresh_token: &Secret,
        previous: &SignedIn,
    ) -> Result<SignedIn, SignInError> {
        let mut renewed = self.redeem_refresh(refresh_token, Some(previous)).await?;
        if renewed.sub != previous.sub {
            return Err(SignInError::SubjectChanged);
        }
        if renewed.refresh_token.is_none() {
            // No rotation: the old refresh token stays valid.
            renewed.refresh_token = Some(refresh_token.clone());
        }
        Ok(renewed)
    }

    /// A refresh token → validated tokens and the user. `previous` is the session being renewed; the
    /// relay, which keeps no sessions, passes `None` and takes the person from the new ID token or
    /// from userinfo.
    pub async fn redeem_refresh(
        &self,
        refresh_token: &Secret,
        previous: Option<&SignedIn>,
    ) -> Result<SignedIn, SignInError> {
        let metadata = self.discovery.metadata().await?;
        let refused = |e: ProviderError| match &e {
            ProviderError::Status {
                oauth_error: Some(code),
                ..
            } if code == "invalid_grant" => SignInError::RefreshRefused(e),
            _ => SignInError::Exchange(e),
        };
        match &self.settings.exchange {
            Exchange::Direct(auth) => {
                let (tokens, _) = self
                    .token_endpoint(&metadata, auth)
                    .refresh(refresh_token)
                    .await
                    .map_err(refused)?;
                let mut provider_time = Duration::ZERO;
                self.finish(&metadata, tokens, None, previous, true, &mut provider_time)
                    .await
            }
            Exchange::Relay(relay) => {
                let (answer, relay_time) = relay.refresh(refresh_token).await.map_err(refused)?;
                self.check_relay_answer(&metadata, answer, None, previous, relay_time)
                    .await
            }
        }
    }

    /// The relay's answer, checked here too: the ID token is validated by the agent's own rules (the
    /// nonce only the agent knows included) and must be about the person the relay fetched.
    async fn check_relay_answer(
        &self,
        metadata: &ProviderMetadata,
        answer: RelayTokens,
        nonce: Option<&str>,
        previous: Option<&SignedIn>,
        relay_time: Duration,
    ) -> Result<SignedIn, SignInError> {
        let now = self.clock.now();
        let (id_token, claims) = self
            .id_token_claims(
                metadata,
                answer.id_token.as_ref(),
                &answer.access_token,
                nonce,
                previous.is_none(),
                previous,
            )
            .await?
            .ok_or(SignInError::NoIdToken)?;
        let sub = subject(&claims, previous);
        if answer.sub != sub {
            return Err(SignInError::RelaySubjectMismatch);
        }
        let mut user = answer.user;
        if claims.is_empty() {
            keep_sign_in_choices(&mut user, previous);
        } else {
            user.assurance = User::from_claims(&claims, &Map::new()).assurance;
        }
        Ok(SignedIn {
            user,
            sid: session_id(&claims, previous),
            sub,
            access_token: answer.access_token,
            expires_at: now.saturating_add(
                answer
                    .expires_in
                    .unwrap_or_else(|| answer.expires_at.saturating_sub(now))
                    .clamp(1, MAX_TOKEN_LIFETIME_SECS),
            ),
            refresh_token: answer.refresh_token,
            id_token,
            events_ticket: answer
                .events_ticket
                .or_else(|| previous.and_then(|p| p.events_ticket.clone())),
            callback_to_done: None,
            provider_time: relay_time,
        })
    }

    async fn finish(
        &self,
        metadata: &ProviderMetadata,
        tokens: TokenResponse,
        nonce: Option<&str>,
        previous: Option<&SignedIn>,
        refreshing: bool,
        provider_time: &mut Duration,
    ) -> Result<SignedIn, SignInError> {
        let now = self.clock.now();
        let found = self
            .id_token_claims(
                metadata,
                tokens.id_token.as_ref(),
                &tokens.access_token,
                nonce,
                !refreshing,
                previous,
            )
            .await?;
        let (id_token, claims) = match found {
            Some(found) => found,
            // The relay's refresh without one: the person is who userinfo says the token is for.
            None if refreshing && metadata.userinfo_endpoint.is_some() => {
                (Secret::new(""), Map::new())
            }
            None => return Err(SignInError::NoIdToken),
        };
        let mut sub = subject(&claims, previous);
        let info = match &metadata.userinfo_endpoint {
            Some(endpoint) => {
                let http = self.discovery.http();
                let started = Instant::now();
                let info: Map<String, Value> = http
                    .json(
                        "the provider's userinfo endpoint",
                        http.inner()
                            .get(endpoint)
                            .bearer_auth(tokens.access_token.expose()),
                    )
                    .await
                    .map_err(SignInError::Userinfo)?;
                *provider_time += started.elapsed();
                let info_sub = info.get("sub").and_then(Value::as_str);
                if sub.is_empty() {
                    sub = info_sub.unwrap_or_default().to_string();
                } else if info_sub != Some(sub.as_str()) {
                    return Err(SignInError::UserinfoSubjectMismatch);
                }
                info
            }
            None => Map::new(),
        };
        if sub.is_empty() {
            return Err(SignInError::NoIdToken);
        }
        let mut user = User::from_claims(&claims, &info);
        if claims.is_empty() {
            keep_sign_in_choices(&mut user, previous);
        }
        Ok(SignedIn {
            user,
            sid: session_id(&claims, previous),
            sub,
            access_token: tokens.access_token,
            expires_at: now.saturating_add(
                tokens
                    .expires_in
                    .unwrap_or(300)
                    .clamp(1, MAX_TOKEN_LIFETIME_SECS),
            ),
            refresh_token: tokens.refresh_token,
            id_token,
            events_ticket: None,
            callback_to_done: None,
            provider_time: *provider_time,
        })
    }

    /// The ID token that came with new tokens, validated, and its claims; on a refresh without one,
    /// the sign-in's ID token and no claims (the sign-in's stand). `None`: no ID token at all.
    async fn id_token_claims(
        &self,
        metadata: &ProviderMetadata,
        id_token: Option<&Secret>,
        access_token: &Secret,
        nonce: Option<&str>,
        fresh_sign_in: bool,
        previous: Option<&SignedIn>,
    ) -> Result<Option<(Secret, Map<String, Value>)>, SignInError> {
        match (id_token, previous) {
            (Some(id_token), _) => {
                let claims = self
                    .validate_id_token(
                        metadata,
                        id_token.expose(),
                        nonce,
                        fresh_sign_in,
                        Some(access_token.expose()),
                    )
                    .await?;
                Ok(Some((id_token.clone(), claims)))
            }
            (None, Some(previous)) => Ok(Some((previous.id_token.clone(), Map::new()))),
            (None, None) => Ok(None),
        }
    }

    async fn validate_id_token(
        &self,
        metadata: &ProviderMetadata,
        token: &str,
        nonce: Option<&str>,
        fresh_sign_in: bool,
        access_token: Option<&str>,
    ) -> Result<Map<String, Value>, SignInError> {
        if let Some(found) = validate::unverified_issuer(token).filter(|iss| iss != self.issuer()) {
            let expected = self.issuer().to_owned();
            return Err(IdTokenError::WrongIssuer { expected, found }.into());
        }
        let algs = accepted_algs(metadata);
        let verified = self
            .discovery
            .check_with_keys(
                |keys| validate::verify_signature(token, &algs, keys),
                |e| matches!(e, IdTokenError::UnknownKey(_)),
            )
            .await??;
        let expected = Expected {
            issuer: self.issuer(),
            client_id: &self.settings.client_id,
            nonce,
            // On refresh auth_time stays that of the original sign-in (OIDC Core 12.2).
            max_age: if fresh_sign_in {
                self.settings.max_age
            } else {
                None
            },
            acr_values: if fresh_sign_in {
                self.settings.acr_values.as_deref()
            } else {
                None
            },
            algs: &algs,
            access_token,
            now: self.clock.now(),
        };
        validate::check_claims(&verified.claims, verified.alg, &expected)?;
        Ok(verified.claims)
    }

    /// An ID token an agent hands back (the relay's token exchange), judged by the sign-in's rules that
    /// do not need the sign-in itself: signature by the provider's published keys, issuer byte for byte,
    /// audience and `azp` this client, expiry and `iat`. The nonce and `at_hash` were checked by the agent
    /// at sign-in. Its claims when it holds.
    pub async fn check_id_token(&self, token: &Secret) -> Result<Map<String, Value>, SignInError> {
        let metadata = self.discovery.metadata().await?;
        self.validate_id_token(&metadata, token.expose(), None, false, None)
            .await
    }

    /// Revokes a refresh token (RFC 7009) with this client's credentials — through the relay when it
    /// holds them. `Ok(false)`: the provider offers no revocation endpoint.
    pub async fn revoke_refresh_token(
        &self,
        refresh_token: &Secret,
    ) -> Result<bool, ProviderError> {
        let metadata = self
            .discovery
            .metadata()
            .await
            .map_err(|e| ProviderError::Unreachable {
                what: "the provider's discovery document".into(),
                cause: match &e {
                    DiscoveryError::Provider(ProviderError::Unreachable { cause, .. }) => *cause,
                    _ => Unreached::Other,
                },
                detail: e.to_string(),
            })?;
        self.revoke_with(&metadata, refresh_token).await
    }

    async fn revoke_with(
        &self,
        metadata: &ProviderMetadata,
        refresh_token: &Secret,
    ) -> Result<bool, ProviderError> {
        let auth = match &self.settings.exchange {
            Exchange::Relay(relay) => return relay.revoke(refresh_token).await,
            Exchange::Direct(auth) => auth,
        };
        let Some(endpoint) = &metadata.revocation_endpoint else {
            return Ok(false);
        };
        let mut form = vec![
            ("token", refresh_token.expose().to_string()),
            ("token_type_hint", "refresh_token".into()),
        ];
        form.extend(auth.form_fields(
            &self.settings.client_id,
            &metadata.token_endpoint,
            self.clock.now(),
        ));
        let http = self.discovery.http();
        let (status, _) = http
            .send(
                "the revocation endpoint",
                http.inner().post(endpoint).form(&form),
            )
            .await?;
        if status >= 400 {
            return Err(ProviderError::Status {
                what: "the revocation endpoint".into(),
                status,
                description: None,
                oauth_error: None,
            });
        }
        Ok(true)
    }

    /// Best effort at logout: revoke the refresh token and end the provider session. Errors are
    /// returned for the log, never for the person (they are signed out locally whatever happens).
    pub async fn end_at_provider(
        &self,
        refresh_token: Option<&Secret>,
        id_token: &Secret,
        end_session: bool,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let Ok(metadata) = self.discovery.metadata().await else {
            return vec!["the provider could not be reached to end the session there".into()];
        };
        let http = self.discovery.http();
        if let Some(rt) = refresh_token
            && let Err(e) = self.revoke_with(&metadata, rt).await
        {
            problems.push(e.to_string());
        }
        if end_session && let Some(endpoint) = &metadata.end_session_endpoint {
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("id_token_hint", id_token.expose())
                .append_pair("client_id", &self.settings.client_id)
                .finish();
            let separator = if endpoint.contains('?') { '&' } else { '?' };
            let url = format!("{endpoint}{separator}{query}");
            match http
                .send("the end-session endpoint", http.inner().get(url))
                .await
            {
                Ok((status, _)) if status < 400 => {}
                Ok((status, _)) => {
                    problems.push(format!("the end-session endpoint answered HTTP {status}"))
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        problems
    }
}
