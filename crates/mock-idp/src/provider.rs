//! The provider's state and rules, apart from HTTP: authorization requests, codes, tokens, sessions,
//! client authentication, logout, and the test controls (faults, key rotation, token expectations).

use crate::keys::{KeyInfo, KeyRing};
use crate::model::{
    Authenticator, Client, ClientAuthMethod, KNOWN_ACR_VALUES, User, acr_for, acr_satisfied_by,
};
use cis2_jose::{Alg, JwkSet, SigningKey, UnverifiedJwt, b64url, random_token, sha256_b64url};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The realm path CIS2 serves under; the issuer is scheme://host:port + this.
pub const REALM_PATH: &str = "/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

/// The scopes CIS2 accepts.
pub const SCOPES: [&str; 10] = [
    "openid",
    "profile",
    "email",
    "nhsperson",
    "associatedorgs",
    "nationalrbacaccess",
    "professionalmemberships",
    "organisationalmemberships",
    "selectedrole",
    "changedrole",
];

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// The SSO cookie ForgeRock AM sets.
pub const SSO_COOKIE: &str = "iPlanetDirectoryPro";

/// How long things live, in seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Lifetimes {
    pub code: u64,
    pub access_token: u64,
    pub id_token: u64,
    pub refresh_token: u64,
    pub sso_session: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            code: 60,
            access_token: 3600,
            id_token: 3600,
            refresh_token: 8 * 3600,
            sso_session: 12 * 3600,
        }
    }
}

/// An OAuth error as the token, userinfo and authorize endpoints return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(status: u16, error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            status,
            error,
            description: description.into(),
        }
    }
    fn request(description: impl Into<String>) -> OAuthError {
        OAuthError::new(400, "invalid_request", description)
    }
    fn grant(description: impl Into<String>) -> OAuthError {
        OAuthError::new(400, "invalid_grant", description)
    }
    fn client(description: impl Into<String>) -> OAuthError {
        OAuthError::new(401, "invalid_client", description)
    }
}

/// What an endpoint does instead of its job, for other components' fault tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    None,
    /// 500 with a server_error body.
    Error500,
    /// Never answers (for as long as the client waits).
    Hang,
    /// 200 with a body that is not JSON.
    Malformed,
    /// Answers normally, after `delay_ms` (a slow provider, for race tests).
    Delay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    Token,
    Userinfo,
    Jwks,
    Discovery,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub endpoint: FaultTarget,
    pub mode: FaultMode,
    /// How many requests it applies to; absent: until changed.
    #[serde(default)]
    pub count: Option<u32>,
    /// For `delay`: how long, in milliseconds.
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// How the next ID token is to be spoiled: the per-test expectation that drives a relying party's
/// negative tests (modelled on the OpenID Foundation's RP certification cases).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signing {
    #[default]
    Normal,
    /// `alg: none`, empty signature.
    None,
    /// Signed by a key the JWKS does not publish (a fresh `kid`).
    UnknownKey,
    /// No `kid` in the header.
    NoKid,
    /// HS256 with the client's secret as the key.
    Hs256ClientSecret,
    /// A valid header and claims with a corrupted signature.
    BadSignature,
}

/// Overrides for the next token response (applies once, to the next ID token issued).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenExpectation {
    /// Claims to set (or replace) in the ID token.
    #[serde(default)]
    pub id_token_claims: Map<String, Value>,
    /// Claims to remove from the ID token.
    #[serde(default)]
    pub id_token_remove: Vec<String>,
    #[serde(default)]
    pub signing: Signing,
    /// Claims to set in the next userinfo answer.
    #[serde(default)]
    pub userinfo_claims: Map<String, Value>,
}

/// An authorization request that passed its checks and waits for the user.
#[derive(Debug, Clone)]
pub struct PendingAuth {
    pub txn: String,
    pub client_id: String,
    pub client_name: String,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub scopes: Vec<String>,
    pub acr_values: Vec<String>,
    pub prompt_login: bool,
    pub max_age: Option<u64>,
    pub code_challenge: String,
    pub created: u64,
    /// Set once the user has authenticated, while a role is being chosen.
    pub authenticated: Option<SsoSession>,
}

impl PendingAuth {
    fn wants_role(&self) -> bool {
        self.scopes
            .iter()
            .any(|s| s == "selectedrole" || s == "changedrole")
    }
}

/// The browser's signed-in session at the provider (its cookie).
#[derive(Debug, Clone)]
pub struct SsoSession {
    pub uid: String,
    pub authenticator: Authenticator,
    pub auth_time: u64,
    pub sid: String,
}

/// What a grant of tokens is about.
#[derive(Debug, Clone)]
struct Grant {
    client_id: String,
    uid: String,
    scopes: Vec<String>,
    sid: String,
    auth_time: u64,
    acr: String,
    authenticator: Authenticator,
    selected_roleid: Option<String>,
}

#[derive(Debug, Clone)]
struct CodeGrant {
    grant: Grant,
    redirect_uri: String,
    code_challenge: String,
    nonce: Option<String>,
    state: Option<String>,
    expires_at: u64,
    redeemed: bool,
    /// Tokens issued for this code: revoked if the code is replayed (RFC 6749 §4.1.2).
    issued: Vec<String>,
}

#[derive(Debug, Clone)]
struct TokenGrant {
    grant: Grant,
    expires_at: u64,
}

/// The outcome of a step of the browser flow.
#[derive(Debug)]
pub enum FlowStep {
    /// Show this error page; nothing may be redirected (unknown client, unregistered redirect URI).
    ErrorPage { status: u16, message: String },
    /// Send the browser here (a code, or an OAuth error, for the client).
    Redirect {
        location: String,
        set_session: Option<String>,
    },
    /// Show the sign-in page.
    Login {
        pending: PendingAuth,
        users: Vec<User>,
        offered: Vec<Authenticator>,
        error: Option<String>,
    },
    /// Show the role picker.
    SelectRole {
        pending: PendingAuth,
        user: User,
        set_session: Option<String>,
    },
}

/// A back-channel logout POST and how it went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub client_id: String,
    pub uri: String,
    /// The HTTP status, or none when the client could not be reached.
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// RFC 8693's grant type and token types.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

struct Inner {
    users: Vec<User>,
    clients: HashMap<String, Client>,
    keys: KeyRing,
    pending: HashMap<String, PendingAuth>,
    sessions: HashMap<String, SsoSession>,
    codes: HashMap<String, CodeGrant>,
    access_tokens: HashMap<String, TokenGrant>,
    refresh_tokens: HashMap<String, TokenGrant>,
    used_jtis: HashMap<String, u64>,
    faults: HashMap<FaultTarget, (FaultMode, Option<u32>, u64)>,
    next_token: Option<TokenExpectation>,
    clock_offset_secs: i64,
    deliveries: Vec<Delivery>,
    userinfo_overrides: HashMap<String, Map<String, Value>>,
}

/// The sandbox CIS2 provider.
pub struct Provider {
    issuer: String,
    lifetimes: Lifetimes,
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Splits a space-separated parameter.
fn words(value: Option<&String>) -> Vec<String> {
    value
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

impl Provider {
    pub fn new(
        issuer: String,
        users: Vec<User>,
        clients: Vec<Client>,
        lifetimes: Lifetimes,
        signing_key: SigningKey,
    ) -> Provider {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client");
        Provider {
            issuer,
            lifetimes,
            http,
            inner: Mutex::new(Inner {
                users,
                clients: clients
                    .into_iter()
                    .map(|c| (c.client_id.clone(), c))
                    .collect(),
                keys: KeyRing::new(signing_key),
                pending: HashMap::new(),
                sessions: HashMap::new(),
                codes: HashMap::new(),
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                used_jtis: HashMap::new(),
                faults: HashMap::new(),
                next_token: None,
                clock_offset_secs: 0,
                deliveries: Vec::new(),
                userinfo_overrides: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in this file; the state is still consistent
        // enough for a test provider, so keep serving rather than poison every later request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    pub fn token_endpoint(&self) -> String {
        self.endpoint("/access_token")
    }

    /// Provider time: the wall clock plus whatever a test advanced it by.
    pub fn now(&self) -> u64 {
        self.lock().now()
    }

    pub fn advance_clock(&self, secs: i64) -> u64 {
        self.lock().clock_offset_secs += secs;
        self.now()
    }

    pub fn discovery(&self) -> Value {
        let e = |p: &str| self.endpoint(p);
        json!({
            "issuer": self.issuer,
            "authorization_endpoint": e("/authorize"),
            "token_endpoint": e("/access_token"),
            "userinfo_endpoint": e("/userinfo"),
            "jwks_uri": e("/connect/jwk_uri"),
            "end_session_endpoint": e("/connect/endSession"),
            "revocation_endpoint": e("/token/revoke"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "scopes_supported": SCOPES,
            "claims_supported": [
                "sub", "iss", "aud", "azp", "acr", "amr", "auth_time", "iat", "exp", "nonce",
                "at_hash", "s_hash", "sid", "selected_roleid", "id_assurance_level",
                "authentication_assurance_level", "name", "given_name", "family_name", "uid",
                "email", "nhsid_useruid", "title", "initials", "middle_names", "display_name",
                "idassurancelevel", "nhsid_nrbac_roles", "nhsid_user_orgs"
            ],
            "acr_values_supported": KNOWN_ACR_VALUES,
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_post", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "RS512", "PS256"],
            "id_token_signing_alg_values_supported": ["RS256", "RS512", "PS256"],
            "userinfo_signing_alg_values_supported": [],
            "request_parameter_supported": false,
            "claims_parameter_supported": false,
            "prompt_values_supported": ["none", "login"],
            "backchannel_logout_supported": true,
            "backchannel_logout_session_supported": true,
            "frontchannel_logout_supported": false,
            "authorization_response_iss_parameter_supported": false,
        })
    }

    pub fn jwks(&self) -> JwkSet {
        self.lock().keys.jwks()
    }

    // ---- faults and test controls -------------------------------------------------------------

    pub fn set_fault(&self, request: FaultRequest) {
        let mut inner = self.lock();
        if request.mode == FaultMode::None {
            inner.faults.remove(&request.endpoint);
        } else {
            inner.faults.insert(
                request.endpoint,
                (
                    request.mode,
                    request.count,
                    request.delay_ms.unwrap_or(1000),
                ),
            );
        }
    }

    /// The fault for one request to `target`, counting it down.
    pub fn take_fault(&self, target: FaultTarget) -> (FaultMode, u64) {
        let mut inner = self.lock();
        let Some((mode, count, delay_ms)) = inner.faults.get_mut(&target) else {
            return (FaultMode::None, 0);
        };
        let (mode, delay_ms) = (*mode, *delay_ms);
        match count {
            Some(0) => {
                inner.faults.remove(&target);
                return (FaultMode::None, 0);
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    inner.faults.remove(&target);
                }
            }
            None => {}
        }
        (mode, delay_ms)
    }

    pub fn expect_next_token(&self, expectation: TokenExpectation) {
        self.lock().next_token = Some(expectation);
    }

    pub fn keys(&self) -> Vec<KeyInfo> {
        self.lock().keys.list()
    }

    pub fn add_next_key(&self) -> KeyInfo {
        let key = SigningKey::generate(Alg::RS256);
        self.lock().keys.add_next(key)
    }

    pub fn activate_next_key(&self) -> Result<KeyInfo, &'static str> {
        self.lock().keys.activate_next()
    }

    pub fn retire_previous_keys(&self) -> Vec<String> {
        self.lock().keys.retire_previous()
    }

    pub fn register_client(&self, client: Client) -> Result<(), String> {
        client.check()?;
        self.lock().clients.insert(client.client_id.clone(), client);
        Ok(())
    }

    pub fn client(&self, client_id: &str) -> Option<Client> {
        self.lock().clients.get(client_id).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.lock().users.clone()
    }

    /// Ends every grant the user holds: refresh tokens, access tokens, unredeemed codes, SSO sessions.
    pub fn revoke_user(&self, uid: &str) -> Result<usize, String> {
        let mut inner = self.lock();
        if !inner.users.iter().any(|u| u.uid == uid) {
            return Err(format!("no user with uid {uid}"));
        }
        let before = inner.refresh_tokens.len() + inner.access_tokens.len();
        inner.refresh_tokens.retain(|_, g| g.grant.uid != uid);
        inner.access_tokens.retain(|_, g| g.grant.uid != uid);
        inner.codes.retain(|_, c| c.grant.uid != uid);
        inner.sessions.retain(|_, s| s.uid != uid);
        Ok(before - inner.refresh_tokens.len() - inner.access_tokens.len())
    }

    /// How many access and refresh tokens the user holds (tests check that logout revoked them).
    pub fn live_tokens(&self, uid: &str) -> usize {
        let inner = self.lock();
        inner
            .access_tokens
            .values()
            .chain(inner.refresh_tokens.values())
            .filter(|g| g.grant.uid == uid)
            .count()
    }

    /// How many refresh tokens the user holds.
    pub fn live_refresh_tokens(&self, uid: &str) -> usize {
        let inner = self.lock();
        inner
            .refresh_tokens
            .values()
            .filter(|g| g.grant.uid == uid)
            .count()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    // ---- the browser flow ---------------------------------------------------------------------

    /// `GET /authorize`.
    pub fn authorize(
        &self,
        params: &HashMap<String, String>,
        session_cookie: Option<&str>,
    ) -> FlowStep {
        let now = self.now();
        let mut inner = self.lock();
        let Some(client_id) = params.get("client_id") else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "The request has no client_id, so the sign-in cannot continue.".into(),
            };
        };
        let Some(client) = inner.clients.get(client_id).cloned() else {
            return FlowStep::ErrorPage {
                status: 400,
                message: format!("No application is registered with client_id {client_id}."),
            };
        };
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "The request has no redirect_uri.".into(),
            };
        };
        if !client.accepts_redirect_uri(redirect_uri) {
            return FlowStep::ErrorPage {
                status: 400,
                message: format!(
                    "The redirect_uri {redirect_uri} is not registered for {client_id}; \
                     the sign-in was stopped so that no code goes to an unknown address."
                ),
            };
        }
        let state = params.get("state").cloned();
        let fail = |error: &str, description: &str| FlowStep::Redirect {
            location: error_redirect(redirect_uri, error, description, state.as_deref()),
            set_session: None,
        };
        match params.get("response_type").map(String::as_str) {
            Some("code") => {}
            Some(_) => {
                return fail(
                    "unsupported_response_type",
                    "only response_type=code is supported",
                );
            }
            None => return fail("invalid_request", "response_type is required"),
        }
        let scopes = words(params.get("scope"));
        if !scopes.iter().any(|s| s == "openid") {
            return fail("invalid_scope", "the openid scope is required");
        }
        if let Some(unknown) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return fail("invalid_scope", &format!("unknown scope {unknown}"));
        }
        let Some(code_challenge) = params.get("code_challenge") else {
            return fail(
                "invalid_request",
                "PKCE is required: code_challenge is missing",
            );
        };
        if params.get("code_challenge_method").map(String::as_str) != Some("S256") {
            return fail("invalid_request", "PKCE code_challenge_method must be S256");
        }
        if code_challenge.len() != 43 {
            return fail(
                "invalid_request",
                "code_challenge must be a base64url SHA-256 (43 characters)",
            );
        }
        let acr_values = words(params.get("acr_values"));
        if let Some(unknown) = acr_values
            .iter()
            .find(|a| !KNOWN_ACR_VALUES.contains(&a.as_str()))
        {
            return fail("invalid_request", &format!("unknown acr_values {unknown}"));
        }
        let max_age = match params.get("max_age").map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => {
                return fail(
                    "invalid_request",
                    "max_age must be a whole number of seconds",
                );
            }
        };
        let prompt = words(params.get("prompt"));
        let prompt_login = prompt.iter().any(|p| p == "login");
        let prompt_none = prompt.iter().any(|p| p == "none");
        if prompt_login && prompt_none {
            return fail(
                "invalid_request",
                "prompt=none cannot be combined with other values",
            );
        }
        let pending = PendingAuth {
            txn: random_token(18),
            client_id: client_id.clone(),
            client_name: client.name.clone().unwrap_or_else(|| client_id.clone()),
            redirect_uri: redirect_uri.clone(),
            state: state.clone(),
            nonce: params.get("nonce").cloned(),
            scopes,
            acr_values,
            prompt_login,
            max_age,
            code_challenge: code_challenge.clone(),
            created: now,
            authenticated: None,
        };
        inner.pending.retain(|_, p| p.created + 1800 > now);
        // Reuse the browser's session when the request allows it (no prompt=login, within max_age, strong
        // enough for the acr asked).
        let reusable = session_cookie
            .and_then(|c| inner.sessions.get(c))
            .filter(|s| !prompt_login && s.auth_time + self.lifetimes.sso_session > now)
            .filter(|s| max_age.is_none_or(|m| now.saturating_sub(s.auth_time) <= m))
            .filter(|s| acr_for(&pending.acr_values, s.authenticator).is_some())
            .cloned();
        match reusable {
            Some(session) => self.after_authentication(&mut inner, pending, session, None, now),
            None if prompt_none => fail(
                "login_required",
                "the user is not signed in and prompt=none was asked",
            ),
            None => {
                inner.pending.insert(pending.txn.clone(), pending.clone());
                let offered = offered_authenticators(&pending.acr_values);
                FlowStep::Login {
                    pending,
                    users: inner.users.clone(),
                    offered,
                    error: None,
                }
            }
        }
    }

    /// `POST /sandbox/login`: the user picked who they are and how they authenticate (or cancelled).
    pub fn login(&self, form: &HashMap<String, String>) -> FlowStep {
        let now = self.now();
        let mut inner = self.lock();
        let Some(pending) = form.get("txn").and_then(|t| inner.pending.remove(t)) else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "This sign-in has expired or was already finished. Start again from your application.".into(),
            };
        };
        if form.get("action").map(String::as_str) == Some("cancel") {
            return FlowStep::Redirect {
                location: error_redirect(
                    &pending.redirect_uri,
                    "access_denied",
                    "the user cancelled the sign-in",
                    pending.state.as_deref(),
                ),
                set_session: None,
            };
        }
        let offered = offered_authenticators(&pending.acr_values);
        let retry = |inner: &mut Inner, pending: PendingAuth, error: String| {
            inner.pending.insert(pending.txn.clone(), pending.clone());
            FlowStep::Login {
                pending,
                users: inner.users.clone(),
                offered: offered.clone(),
                error: Some(error),
            }
        };
        let user = form
            .get("uid")
            .and_then(|uid| inner.users.iter().find(|u| &u.uid == uid))
            .cloned();
        let Some(user) = user else {
            return retry(&mut inner, pending, "Choose a test user.".into());
        };
        let Some(authenticator) = form
            .get("authenticator")
            .and_then(|a| Authenticator::from_form_value(a))
        else {
            return retry(&mut inner, pending, "Choose how to sign in.".into());
        };
        if !offered.contains(&authenticator) {
            let message = format!(
                "{} is not accepted by this service (it asks for {}).",
                authenticator.label(),
                pending.acr_values.join(" or ")
            );
            return retry(&mut inner, pending, message);
        }
        if !user.authenticators.contains(&authenticator) {
            let message = if user.authenticators.iter().any(|a| offered.contains(a)) {
                format!(
                    "{} has no {} registered. Choose one of theirs.",
                    user.name(),
                    authenticator.label()
                )
            } else {
                format!(
                    "{} has no authenticator strong enough for this service (it asks for {}).",
                    user.name(),
                    pending.acr_values.join(" or ")
                )
            };
            return retry(&mut inner, pending, message);
        }
        let session = SsoSession {
            uid: user.uid.clone(),
            authenticator,
            auth_time: now,
            sid: random_token(16),
        };
        let cookie = random_token(24);
        inner.sessions.insert(cookie.clone(), session.clone());
        self.after_authentication(&mut inner, pending, session, Some(cookie), now)
    }

    /// `POST /sandbox/select-role`.
    pub fn select_role(&self, form: &HashMap<String, String>) -> FlowStep {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut pending) = form.get("txn").and_then(|t| inner.pending.remove(t)) else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "This sign-in has expired or was already finished. Start again from your application.".into(),
            };
        };
        let Some(session) = pending.authenticated.take() else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "Sign in before choosing a role.".into(),
            };
        };
        if form.get("action").map(String::as_str) == Some("cancel") {
            return FlowStep::Redirect {
                location: error_redirect(
                    &pending.redirect_uri,
                    "access_denied",
                    "the user did not choose a role",
                    pending.state.as_deref(),
                ),
                set_session: None,
            };
        }
        let user = inner.users.iter().find(|u| u.uid == session.uid).cloned();
        let Some(user) = user else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "That user no longer exists.".into(),
            };
        };
        match form.get("role").and_then(|r| user.role(r)) {
            Some(role) => {
                let role_id = role.person_roleid.clone();
                self.issue_code(&mut inner, pending, session, Some(role_id), None, now)
            }
            None => {
                pending.authenticated = Some(session);
                inner.pending.insert(pending.txn.clone(), pending.clone());
                FlowStep::SelectRole {
                    pending,
                    user,
                    set_session: None,
                }
            }
        }
    }

    fn after_authentication(
        &self,
        inner: &mut Inner,
        mut pending: PendingAuth,
        session: SsoSession,
        set_session: Option<String>,
        now: u64,
    ) -> FlowStep {
        let Some(user) = inner.users.iter().find(|u| u.uid == session.uid).cloned() else {
            return FlowStep::ErrorPage {
                status: 400,
                message: "That user no longer exists.".into(),
            };
        };
        if pending.wants_role() && user.roles.len() > 1 {
            pending.authenticated = Some(session);
            inner.pending.insert(pending.txn.clone(), pending.clone());
            return FlowStep::SelectRole {
                pending,
                user,
                set_session,
            };
        }
        let role = if pending.wants_role() {
            user.roles.first().map(|r| r.person_roleid.clone())
        } else {
            None
        };
        self.issue_code(inner, pending, session, role, set_session, now)
    }

    fn issue_code(
        &self,
        inner: &mut Inner,
        pending: PendingAuth,
        session: SsoSession,
        selected_roleid: Option<String>,
        set_session: Option<String>,
        now: u64,
    ) -> FlowStep {
        let Some(acr) = acr_for(&pending.acr_values, session.authenticator) else {
            return FlowStep::Redirect {
                location: error_redirect(
                    &pending.redirect_uri,
                    "access_denied",
                    "the authenticator used does not meet the requested acr_values",
                    pending.state.as_deref(),
                ),
                set_session,
            };
        };
        let code = random_token(32);
        inner.codes.retain(|_, c| c.expires_at + 600 > now);
        inner.codes.insert(
            code.clone(),
            CodeGrant {
                grant: Grant {
                    client_id: pending.client_id.clone(),
                    uid: session.uid.clone(),
                    scopes: pending.scopes.clone(),
                    sid: session.sid.clone(),
                    auth_time: session.auth_time,
                    acr,
                    authenticator: session.authenticator,
                    selected_roleid,
                },
                redirect_uri: pending.redirect_uri.clone(),
                code_challenge: pending.code_challenge.clone(),
                nonce: pending.nonce.clone(),
                state: pending.state.clone(),
                expires_at: now + self.lifetimes.code,
                redeemed: false,
                issued: Vec::new(),
            },
        );
        let mut pairs = vec![("code", code.as_str())];
        if let Some(state) = &pending.state {
            pairs.push(("state", state));
        }
        pairs.push(("client_id", &pending.client_id));
        FlowStep::Redirect {
            location: with_query(&pending.redirect_uri, &pairs),
            set_session,
        }
    }

    // ---- the API Platform's token exchange ----------------------------------------------------

    /// The API-Platform-like token URL this provider serves beside CIS2 (outside the realm, as the
    /// platform is another service): `http://host:port/oauth2/token`.
    pub fn api_token_endpoint(&self) -> String {
        let base = self.issuer.strip_suffix(REALM_PATH).unwrap_or(&self.issuer);
        format!("{base}/oauth2/token")
    }

    /// `POST /oauth2/token`: RFC 8693 as the NHS API Platform does it for "CIS2 separate authentication
    /// and authorisation". The application (registered as a client whose `client_id` is its API key and
    /// whose keys verify its assertions) signs an RS512 assertion for this URL; the subject token must be
    /// an ID token this provider signed, for one of its clients, not expired. The access token is
    /// opaque and new at each exchange.
    pub async fn api_exchange(&self, form: &HashMap<String, String>) -> Result<Value, OAuthError> {
        match form.get("grant_type").map(String::as_str) {
            Some(TOKEN_EXCHANGE) => {}
            Some(other) => {
                return Err(OAuthError::new(
                    400,
                    "unsupported_grant_type",
                    format!("grant_type {other} is not supported; use {TOKEN_EXCHANGE}"),
                ));
            }
            None => return Err(OAuthError::request("grant_type is required")),
        }
        if form.get("client_assertion_type").map(String::as_str) != Some(CLIENT_ASSERTION_TYPE) {
            return Err(OAuthError::client(format!(
                "client_assertion_type must be {CLIENT_ASSERTION_TYPE}"
            )));
        }
        let jwt = form
            .get("client_assertion")
            .ok_or_else(|| OAuthError::client("client_assertion is required"))?;
        let api_key = UnverifiedJwt::parse(jwt)
            .ok()
            .and_then(|t| {
                t.claims
                    .get("iss")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| OAuthError::client("JWT is not valid: no iss"))?;
        let app = self
            .client(&api_key)
            .ok_or_else(|| OAuthError::client("JWT is not valid: the API key is not registered"))?;
        if app.jwks.is_none() && app.jwks_uri.is_none() {
            return Err(OAuthError::client(
                "JWT is not valid: the application registered no public key",
            ));
        }
        self.check_assertion_for(&app, jwt, &self.api_token_endpoint(), &[Alg::RS512])
            .await?;
        if form.get("subject_token_type").map(String::as_str) != Some(ID_TOKEN_TYPE) {
            return Err(OAuthError::request(format!(
                "subject_token_type must be {ID_TOKEN_TYPE}"
            )));
        }
        let subject = form
            .get("subject_token")
            .ok_or_else(|| OAuthError::request("subject_token is required"))?;
        let now = self.now();
        let unverified = UnverifiedJwt::parse(subject)
            .map_err(|e| OAuthError::grant(format!("the subject token is not valid: {e}")))?;
        // The issuer picks the keys to check with, so a token of another CIS2 environment is named as
        // such rather than as one signed with an unknown key.
        let iss = unverified.claims.get("iss").and_then(Value::as_str);
        if iss != Some(self.issuer.as_str()) {
            return Err(OAuthError::grant(format!(
                "the subject token's issuer {} is not the CIS2 environment this platform trusts",
                iss.map_or_else(|| "(none)".to_string(), |i| format!("{i:?}")),
            )));
        }
        let claims = {
            let inner = self.lock();
            unverified
                .verify(&[Alg::RS256, Alg::RS512, Alg::PS256], &inner.keys.jwks())
                .map_err(|e| OAuthError::grant(format!("the subject token is not valid: {e}")))?
        };
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences.iter().any(|a| self.client(a).is_some()) {
            return Err(OAuthError::grant(
                "the subject token's audience is no client registered with CIS2 Authentication",
            ));
        }
        match claims.get("exp").and_then(Value::as_u64) {
            Some(exp) if exp > now => {}
            _ => return Err(OAuthError::grant("the subject token has expired")),
        }
        // The platform writes expires_in as a string.
        Ok(json!({
            "access_token": random_token(24),
            "token_type": "Bearer",
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "expires_in": self.lifetimes.access_token.to_string(),
        }))
    }

    // ---- the token endpoint -------------------------------------------------------------------

    /// `POST /access_token` with its form already split into single-valued parameters.
    pub async fn token(&self, form: &HashMap<String, String>) -> Result<Value, OAuthError> {
        let client = self.authenticate_client(form).await?;
        match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.redeem_code(&client, form),
            Some("refresh_token") => self.refresh(&client, form),
            Some(other) => Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                format!("grant_type {other} is not supported"),
            )),
            None => Err(OAuthError::request("grant_type is required")),
        }
    }

    async fn authenticate_client(
        &self,
        form: &HashMap<String, String>,
    ) -> Result<Client, OAuthError> {
        let assertion = form.get("client_assertion");
        let claimed_id = match assertion {
            Some(jwt) => {
                if form.get("client_assertion_type").map(String::as_str)
                    != Some(CLIENT_ASSERTION_TYPE)
                {
                    return Err(OAuthError::client(format!(
                        "client_assertion_type must be {CLIENT_ASSERTION_TYPE}"
                    )));
                }
                let parsed = UnverifiedJwt::parse(jwt)
                    .map_err(|e| OAuthError::client(format!("JWT is not valid: {e}")))?;
                let iss = parsed
                    .claims
                    .get("iss")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| OAuthError::client("JWT is not valid: no iss"))?;
                if let Some(form_id) = form.get("client_id")
                    && form_id != &iss
                {
                    return Err(OAuthError::client(
                        "JWT is not valid: iss differs from client_id",
                    ));
                }
                iss
            }
            None => form
                .get("client_id")
                .cloned()
                .ok_or_else(|| OAuthError::client("no client authentication was given"))?,
        };
        let client = self
            .client(&claimed_id)
            .ok_or_else(|| OAuthError::client(format!("unknown client {claimed_id}")))?;
        match client.auth_method {
            ClientAuthMethod::PrivateKeyJwt => {
                let Some(jwt) = assertion else {
                    return Err(OAuthError::client(
                        "this client must authenticate with private_key_jwt",
                    ));
                };
                self.check_client_assertion(&client, jwt).await?;
            }
            ClientAuthMethod::ClientSecretPost => {
                if assertion.is_some() {
                    return Err(OAuthError::client(
                        "this client must authenticate with client_secret_post",
                    ));
                }
                let expected = client.client_secret.as_deref().unwrap_or_default();
                match form.get("client_secret") {
                    Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => {}
                    Some(_) => return Err(OAuthError::client("the client secret is wrong")),
                    None => return Err(OAuthError::client("client_secret is required")),
                }
            }
            ClientAuthMethod::None => {
                if assertion.is_some() || form.contains_key("client_secret") {
                    return Err(OAuthError::client(
                        "this is a public client: send client_id only",
                    ));
                }
            }
        }
        Ok(client)
    }

    async fn client_keys(&self, client: &Client) -> Result<JwkSet, OAuthError> {
        if let Some(jwks) = &client.jwks {
            return jwks
                .parse()
                .map_err(|e| OAuthError::client(format!("the client's keys are unusable: {e}")));
        }
        let uri = client.jwks_uri.as_deref().unwrap_or_default();
        let fetched = async {
            self.http
                .get(uri)
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        };
        fetched.await.map_err(|e| {
            OAuthError::client(format!(
                "JWT is not valid: the client's jwks_uri could not be read ({e})"
            ))
        })
    }

    async fn check_client_assertion(&self, client: &Client, jwt: &str) -> Result<(), OAuthError> {
        self.check_assertion_for(
            client,
            jwt,
            &self.token_endpoint(),
            &[Alg::RS256, Alg::RS512, Alg::PS256],
        )
        .await
    }

    /// An RFC 7523 client assertion by `client` for the endpoint `token_endpoint`, signed with one of
    /// `algs` by one of the client's keys.
    async fn check_assertion_for(
        &self,
        client: &Client,
        jwt: &str,
        token_endpoint: &str,
        algs: &[Alg],
    ) -> Result<(), OAuthError> {
        let invalid = |why: &str| OAuthError::client(format!("JWT is not valid: {why}"));
        let keys = self.client_keys(client).await?;
        let claims = UnverifiedJwt::parse(jwt)
            .and_then(|t| t.verify(algs, &keys))
            .map_err(|e| invalid(&e.to_string()))?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("iss") != Some(client.client_id.as_str())
            || text("sub") != Some(client.client_id.as_str())
        {
            return Err(invalid("iss and sub must both be the client_id"));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == token_endpoint,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(token_endpoint)),
            _ => false,
        };
        if !aud_ok {
            return Err(invalid("aud must be the token endpoint"));
        }
        let now = self.now();
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("exp is required"))?;
        if exp <= now {
            return Err(invalid("the assertion has expired"));
        }
        if exp > now + 300 + 5 {
            return Err(invalid("exp may be at most 5 minutes ahead"));
        }
        if let Some(iat) = claims.get("iat").and_then(Value::as_u64)
            && iat > now + 5
        {
            return Err(invalid("iat is in the future"));
        }
        let jti = text("jti").ok_or_else(|| invalid("jti is required"))?;
        let mut inner = self.lock();
        inner.used_jtis.retain(|_, until| *until + 10 > now);
        if inner.used_jtis.contains_key(jti) {
            return Err(invalid("this jti was used before (replayed assertion)"));
        }
        inner.used_jtis.insert(jti.to_string(), exp);
        Ok(())
    }

    fn redeem_code(
        &self,
        client: &Client,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        let now = self.now();
        let mut inner = self.lock();
        let code = form
            .get("code")
            .ok_or_else(|| OAuthError::request("code is required"))?;
        let Some(entry) = inner.codes.get_mut(code) else {
            return Err(OAuthError::grant("the code is unknown"));
        };
        if entry.redeemed {
            // RFC 6749 §4.1.2: a replayed code revokes what it already bought.
            let issued = std::mem::take(&mut entry.issued);
            for token in issued {
                inner.access_tokens.remove(&token);
                inner.refresh_tokens.remove(&token);
            }
            return Err(OAuthError::grant("the code was already used"));
        }
        if entry.expires_at <= now {
            return Err(OAuthError::grant("the code has expired"));
        }
        if entry.grant.client_id != client.client_id {
            return Err(OAuthError::grant("the code was issued to another client"));
        }
        match form.get("redirect_uri") {
            Some(uri) if uri == &entry.redirect_uri => {}
            Some(_) => {
                return Err(OAuthError::grant(
                    "redirect_uri differs from the authorization request",
                ));
            }
            None => return Err(OAuthError::request("redirect_uri is required")),
        }
        let verifier = form
            .get("code_verifier")
            .ok_or_else(|| OAuthError::request("code_verifier is required (PKCE)"))?;
        if !(43..=128).contains(&verifier.len()) || sha256_b64url(verifier) != entry.code_challenge
        {
            return Err(OAuthError::grant("the code_verifier does not match"));
        }
        entry.redeemed = true;
        let code_grant = entry.clone();
        let response = self.issue_tokens(
            &mut inner,
            client,
            &code_grant.grant,
            code_grant.nonce.as_deref(),
            code_grant.state.as_deref(),
            None,
        )?;
        let issued: Vec<String> = ["access_token", "refresh_token"]
            .iter()
            .filter_map(|k| response.get(*k).and_then(Value::as_str).map(str::to_string))
            .collect();
        if let Some(entry) = inner.codes.get_mut(code) {
            entry.issued = issued;
        }
        Ok(response)
    }

    fn refresh(
        &self,
        client: &Client,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        let now = self.now();
        let mut inner = self.lock();
        let token = form
            .get("refresh_token")
            .ok_or_else(|| OAuthError::request("refresh_token is required"))?;
        let Some(entry) = inner.refresh_tokens.get(token).cloned() else {
            return Err(OAuthError::grant(
                "the refresh token is unknown, revoked or already rotated",
            ));
        };
        if entry.expires_at <= now {
            inner.refresh_tokens.remove(token);
            return Err(OAuthError::grant("the refresh token has expired"));
        }
        if entry.grant.client_id != client.client_id {
            return Err(OAuthError::grant(
                "the refresh token was issued to another client",
            ));
        }
        if client.rotate_refresh_tokens {
            inner.refresh_tokens.remove(token);
        }
        let keep = (!client.rotate_refresh_tokens).then_some(token.as_str());
        self.issue_tokens(&mut inner, client, &entry.grant, None, None, keep)
    }

    fn issue_tokens(
        &self,
        inner: &mut Inner,
        client: &Client,
        grant: &Grant,
        nonce: Option<&str>,
        state: Option<&str>,
        kept_refresh_token: Option<&str>,
    ) -> Result<Value, OAuthError> {
        let now = inner.now();
        let user = inner
            .users
            .iter()
            .find(|u| u.uid == grant.uid)
            .cloned()
            .ok_or_else(|| OAuthError::grant("the user no longer exists"))?;
        let access_token = random_token(32);
        inner.access_tokens.retain(|_, g| g.expires_at + 60 > now);
        inner.access_tokens.insert(
            access_token.clone(),
            TokenGrant {
                grant: grant.clone(),
                expires_at: now + self.lifetimes.access_token,
            },
        );
        let alg = client.id_token_signed_response_alg;
        let mut claims = json!({
            "iss": self.issuer,
            "sub": user.uid,
            "aud": client.client_id,
            "azp": client.client_id,
            "iat": now,
            "exp": now + self.lifetimes.id_token,
            "auth_time": grant.auth_time,
            "acr": grant.acr,
            "amr": [grant.authenticator.amr()],
            "sid": grant.sid,
            "at_hash": alg.half_hash(&access_token),
            "id_assurance_level": user.id_assurance_level,
            "authentication_assurance_level": grant.authenticator.level().to_string(),
            "auditTrackingId": random_token(12),
            "tokenName": "id_token",
            "tokenType": "JWTToken",
            "realm": "/NHSIdentity/Healthcare",
        });
        let map = claims.as_object_mut().expect("an object");
        if let Some(nonce) = nonce {
            map.insert("nonce".into(), nonce.into());
        }
        if let Some(state) = state {
            map.insert("s_hash".into(), alg.half_hash(state).into());
        }
        if let Some(role) = &grant.selected_roleid {
            map.insert("selected_roleid".into(), role.clone().into());
        }
        let expectation = inner.next_token.take();
        if let Some(exp) = &expectation {
            for (k, v) in &exp.id_token_claims {
                map.insert(k.clone(), v.clone());
            }
            for k in &exp.id_token_remove {
                map.remove(k);
            }
            if !exp.userinfo_claims.is_empty() {
                inner.pending_userinfo_overrides(&access_token, exp.userinfo_claims.clone());
            }
        }
        let signing = expectation.map(|e| e.signing).unwrap_or_default();
        let id_token = sign_id_token(&inner.keys, alg, signing, client, &claims);
        let mut response = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.lifetimes.access_token,
            "scope": grant.scopes.join(" "),
            "id_token": id_token,
        });
        let refresh_token = match kept_refresh_token {
            Some(kept) => Some(kept.to_string()),
            None if client.refresh_tokens => {
                let rt = random_token(32);
                inner.refresh_tokens.insert(
                    rt.clone(),
                    TokenGrant {
                        grant: grant.clone(),
                        expires_at: now + self.lifetimes.refresh_token,
                    },
                );
                Some(rt)
            }
            None => None,
        };
        if let Some(rt) = refresh_token {
            response["refresh_token"] = rt.into();
        }
        Ok(response)
    }

    // ---- userinfo, revocation -----------------------------------------------------------------

    /// `GET|POST /userinfo` with the bearer token.
    pub fn userinfo(&self, access_token: Option<&str>) -> Result<Value, OAuthError> {
        let now = self.now();
        let mut inner = self.lock();
        let Some(token) = access_token else {
            return Err(OAuthError::new(
                401,
                "invalid_token",
                "no bearer token was sent",
            ));
        };
        let Some(entry) = inner.access_tokens.get(token).cloned() else {
            return Err(OAuthError::new(
                401,
                "invalid_token",
                "the access token is unknown or revoked",
            ));
        };
        if entry.expires_at <= now {
            return Err(OAuthError::new(
                401,
                "invalid_token",
                "the access token has expired",
            ));
        }
        let user = inner
            .users
            .iter()
            .find(|u| u.uid == entry.grant.uid)
            .cloned()
            .ok_or_else(|| OAuthError::new(401, "invalid_token", "the user no longer exists"))?;
        let mut claims = userinfo_claims(&user, &entry.grant.scopes);
        if let Some(overrides) = inner.userinfo_overrides.remove(token) {
            for (k, v) in overrides {
                claims.insert(k, v);
            }
        }
        Ok(Value::Object(claims))
    }

    /// `POST /token/revoke` (RFC 7009): always 200 for a known client, whatever the token.
    pub async fn revoke(&self, form: &HashMap<String, String>) -> Result<(), OAuthError> {
        let client = self.authenticate_client(form).await?;
        let token = form
            .get("token")
            .ok_or_else(|| OAuthError::request("token is required"))?;
        let mut inner = self.lock();
        let owned = |g: &TokenGrant| g.grant.client_id == client.client_id;
        if inner.refresh_tokens.get(token).is_some_and(owned) {
            inner.refresh_tokens.remove(token);
        }
        if inner.access_tokens.get(token).is_some_and(owned) {
            inner.access_tokens.remove(token);
        }
        Ok(())
    }

    // ---- logout -------------------------------------------------------------------------------

    /// `GET /connect/endSession`: ends the provider session named by the hint (or the browser's cookie)
    /// and tells the clients that hold it. Returns where to send the browser, if anywhere.
    pub async fn end_session(
        &self,
        params: &HashMap<String, String>,
        session_cookie: Option<&str>,
    ) -> Result<Option<String>, String> {
        let mut target: Option<(String, Option<String>)> = None; // (sid, client_id)
        if let Some(hint) = params.get("id_token_hint") {
            let claims = UnverifiedJwt::parse(hint)
                .and_then(|t| t.verify(&[Alg::RS256, Alg::RS512], &self.jwks()))
                .map_err(|e| {
                    format!("id_token_hint is not one of this provider's ID tokens: {e}")
                })?;
            if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
                return Err("id_token_hint was issued by another provider".into());
            }
            let sid = claims
                .get("sid")
                .and_then(Value::as_str)
                .ok_or("id_token_hint has no sid")?;
            let aud = claims
                .get("aud")
                .and_then(Value::as_str)
                .map(str::to_string);
            target = Some((sid.to_string(), aud));
        } else if let Some(cookie) = session_cookie
            && let Some(session) = self.lock().sessions.get(cookie)
        {
            target = Some((session.sid.clone(), None));
        }
        let mut redirect = None;
        if let Some((sid, aud)) = target {
            self.logout_sessions(None, Some(&sid)).await;
            if let (Some(uri), Some(client_id)) = (params.get("post_logout_redirect_uri"), aud) {
                let client = self.client(&client_id);
                if client.is_some_and(|c| c.post_logout_redirect_uris.contains(uri)) {
                    let mut pairs = Vec::new();
                    if let Some(state) = params.get("state") {
                        pairs.push(("state", state.as_str()));
                    }
                    redirect = Some(with_query(uri, &pairs));
                } else {
                    return Err(format!(
                        "post_logout_redirect_uri {uri} is not registered for the client"
                    ));
                }
            }
        }
        Ok(redirect)
    }

    /// Ends the provider sessions of `sub` (every one) or `sid`, revokes their refresh tokens and POSTs a
    /// logout token to each client that holds one and registered a back-channel URI.
    pub async fn logout_sessions(&self, sub: Option<&str>, sid: Option<&str>) -> Vec<Delivery> {
        let matches =
            |g: &Grant| sub.is_some_and(|s| g.uid == s) || sid.is_some_and(|s| g.sid == s);
        let mut targets: Vec<(Client, String, String)> = Vec::new(); // client, sub, sid
        {
            let mut inner = self.lock();
            inner.sessions.retain(|_, s| {
                !(sub.is_some_and(|x| s.uid == x) || sid.is_some_and(|x| s.sid == x))
            });
            let mut seen = HashSet::new();
            let grants: Vec<Grant> = inner
                .access_tokens
                .values()
                .chain(inner.refresh_tokens.values())
                .map(|g| g.grant.clone())
                .filter(|g| matches(g))
                .collect();
            for grant in grants {
                if seen.insert((grant.client_id.clone(), grant.sid.clone()))
                    && let Some(client) = inner.clients.get(&grant.client_id)
                    && client.backchannel_logout_uri.is_some()
                {
                    targets.push((client.clone(), grant.uid.clone(), grant.sid.clone()));
                }
            }
            inner.refresh_tokens.retain(|_, g| !matches(&g.grant));
            inner.access_tokens.retain(|_, g| !matches(&g.grant));
        }
        let mut deliveries = Vec::new();
        for (client, sub, sid) in targets {
            let uri = client.backchannel_logout_uri.clone().unwrap_or_default();
            let token = self.logout_token(&client, &sub, &sid);
            let result = self
                .http
                .post(&uri)
                .form(&[("logout_token", token)])
                .send()
                .await;
            deliveries.push(Delivery {
                client_id: client.client_id.clone(),
                uri,
                status: result.as_ref().ok().map(|r| r.status().as_u16()),
                error: result.err().map(|e| e.to_string()),
            });
        }
        self.lock().deliveries.extend(deliveries.clone());
        deliveries
    }

    /// A back-channel logout token for `client` (OpenID Back-Channel Logout 1.0 §2.4).
    pub fn logout_token(&self, client: &Client, sub: &str, sid: &str) -> String {
        let now = self.now();
        let claims = json!({
            "iss": self.issuer,
            "aud": client.client_id,
            "iat": now,
            "exp": now + 120,
            "jti": random_token(16),
            "sub": sub,
            "sid": sid,
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        let signer = self.lock().keys.signer(client.id_token_signed_response_alg);
        signer.sign(&claims)
    }
}

impl Inner {
    fn now(&self) -> u64 {
        unix_now().saturating_add_signed(self.clock_offset_secs)
    }

    fn pending_userinfo_overrides(&mut self, access_token: &str, claims: Map<String, Value>) {
        self.userinfo_overrides
            .insert(access_token.to_string(), claims);
    }
}

/// The claims userinfo returns for `scopes` (cis2-reference.md §5).
pub fn userinfo_claims(user: &User, scopes: &[String]) -> Map<String, Value> {
    let has = |s: &str| scopes.iter().any(|x| x == s);
    let mut claims = Map::new();
    claims.insert("sub".into(), user.uid.clone().into());
    if has("profile") {
        claims.insert("name".into(), user.name().into());
        claims.insert("given_name".into(), user.given_name.clone().into());
        claims.insert("family_name".into(), user.family_name.clone().into());
        claims.insert("uid".into(), user.uid.clone().into());
    }
    if has("email")
        && let Some(email) = &user.email
    {
        claims.insert("email".into(), email.clone().into());
    }
    if has("nhsperson") {
        claims.insert("nhsid_useruid".into(), user.uid.clone().into());
        if let Some(title) = &user.title {
            claims.insert("title".into(), title.clone().into());
        }
        claims.insert("initials".into(), user.initials().into());
        if let Some(middle) = &user.middle_names {
            claims.insert("middle_names".into(), middle.clone().into());
        }
        claims.insert("display_name".into(), user.display_name().into());
        claims.insert(
            "idassurancelevel".into(),
            user.id_assurance_level.clone().into(),
        );
    }
    if has("nationalrbacaccess") {
        claims.insert(
            "nhsid_nrbac_roles".into(),
            serde_json::to_value(&user.roles).expect("roles serialise"),
        );
    }
    if has("associatedorgs") {
        claims.insert(
            "nhsid_user_orgs".into(),
            serde_json::to_value(&user.orgs).expect("orgs serialise"),
        );
    }
    claims
}

/// The authenticators the sign-in page offers for these `acr_values` (all when none were asked).
pub fn offered_authenticators(acr_values: &[String]) -> Vec<Authenticator> {
    Authenticator::ALL
        .into_iter()
        .filter(|a| acr_values.is_empty() || acr_values.iter().any(|acr| acr_satisfied_by(acr, *a)))
        .collect()
}

fn sign_id_token(
    keys: &KeyRing,
    alg: Alg,
    signing: Signing,
    client: &Client,
    claims: &Value,
) -> String {
    let signer = keys.signer(alg);
    match signing {
        Signing::Normal => signer.sign(claims),
        Signing::None => format!(
            "{}.{}.",
            b64url(json!({"alg": "none", "typ": "JWT"}).to_string()),
            b64url(claims.to_string())
        ),
        Signing::UnknownKey => SigningKey::generate(alg).sign(claims),
        Signing::NoKid => {
            signer.sign_with_header(&json!({"alg": alg.as_str(), "typ": "JWT"}), claims)
        }
        Signing::Hs256ClientSecret => {
            let input = format!(
                "{}.{}",
                b64url(json!({"alg": "HS256", "typ": "JWT", "kid": signer.kid()}).to_string()),
                b64url(claims.to_string())
            );
            let secret = client.client_secret.as_deref().unwrap_or("secret");
            let mac = hmac_sha256(secret.as_bytes(), input.as_bytes());
            format!("{input}.{}", b64url(mac))
        }
        Signing::BadSignature => {
            let token = signer.sign(claims);
            let (input, sig) = token.rsplit_once('.').expect("three parts");
            let mut bytes = cis2_jose::b64url_decode(sig).expect("own signature");
            bytes[0] ^= 0x55;
            format!("{input}.{}", b64url(bytes))
        }
    }
}

/// HMAC-SHA256 (RFC 2104), only for forging the HS256 tokens a relying party must refuse.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `base` with `pairs` added to its query.
pub fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    match url::Url::parse(base) {
        Ok(mut url) => {
            {
                let mut query = url.query_pairs_mut();
                for (k, v) in pairs {
                    query.append_pair(k, v);
                }
            }
            url.to_string()
        }
        Err(_) => base.to_string(),
    }
}

fn error_redirect(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> String {
    let mut pairs = vec![("error", error), ("error_description", description)];
    if let Some(state) = state {
        pairs.push(("state", state));
    }
    with_query(redirect_uri, &pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn aal3_requests_offer_only_aal3_authenticators() {
        let offered = offered_authenticators(&["AAL3_ANY".to_string()]);
        assert!(offered.iter().all(|a| a.level() == 3));
        assert_eq!(offered_authenticators(&[]).len(), Authenticator::ALL.len());
    }
}
