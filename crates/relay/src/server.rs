//! The HTTP API (interfaces.md "cis2-relay"): token and refresh exchanges through the shared relying
//! party, the public keys, back-channel logout in and logout events out, health and metrics. Every
//! refusal is a JSON `{error, error_description}`; nothing here logs or echoes a token or a code.

use crate::config::{ApiPlatform, RelayConfig, redirect_allowed};
use crate::fanout::{Ended, Fanout, matches};
use crate::limiter::RateLimiter;
use crate::metrics::Metrics;
use crate::ticket::Tickets;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, MatchedPath, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cis2_jose::{JwkSet, SigningKey};
use cis2_oidc::clock::SharedClock;
use cis2_oidc::http::ProviderError;
use cis2_oidc::logout::{EndedSession, LogoutExpected, LogoutTokenError, validate_logout_token};
use cis2_oidc::rp::{RelyingParty, SignInError, SignedIn, accepted_algs};
use cis2_oidc::secret::Secret;
use cis2_oidc::validate::IdTokenError;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot, watch};

/// How often an idle event stream carries a comment, so proxies and the agent see it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub struct Relay {
    pub config: RelayConfig,
    pub rp: RelyingParty,
    pub public_keys: JwkSet,
    pub tickets: Tickets,
    pub fanout: Fanout,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    pub clock: SharedClock,
    /// Logout token `jti`s already acted on, with when they may be forgotten.
    seen_logout_ids: Mutex<HashMap<String, u64>>,
    /// Becomes true when the relay stops: every event stream then ends.
    closing: watch::Sender<bool>,
    session_streams: Mutex<SessionStreams>,
    /// `[[api_platform]]` by audience name, each with its RS512 key under its registered `kid`.
    platforms: HashMap<String, (ApiPlatform, SigningKey)>,
}

impl Relay {
    pub fn new(
        config: RelayConfig,
        rp: RelyingParty,
        keys: &[SigningKey],
        tickets: Tickets,
        fanout: Fanout,
        clock: SharedClock,
    ) -> Relay {
        Relay {
            tickets,
            limiter: RateLimiter::new(config.limits.requests_per_minute),
            public_keys: JwkSet {
                keys: keys.iter().map(SigningKey::public_jwk).collect(),
            },
            config,
            rp,
            metrics: Metrics::new(fanout.uses_redis()),
            fanout,
            clock,
            seen_logout_ids: Mutex::new(HashMap::new()),
            closing: watch::Sender::new(false),
            session_streams: Mutex::new(SessionStreams::default()),
            platforms: HashMap::new(),
        }
    }

    /// The API Platform registrations `/v1/exchange` serves.
    pub fn with_platforms(mut self, platforms: Vec<(ApiPlatform, SigningKey)>) -> Relay {
        self.platforms = platforms
            .into_iter()
            .map(|(p, key)| (p.audience.clone(), (p, key)))
            .collect();
        self
    }

    /// Ends every event stream now and refuses new ones, as when the relay stops: agents reconnect,
    /// through the load balancer, to another instance.
    pub fn close_event_streams(&self) {
        self.closing.send_replace(true);
    }
}

type Shared = Arc<Relay>;

pub fn router(relay: Shared) -> Router {
    let body_limit = relay.config.limits.max_body_bytes;
    Router::new()
        .route("/v1/token", post(token))
        .route("/v1/refresh", post(refresh))
        .route("/v1/revoke", post(revoke))
        .route("/v1/exchange", post(exchange))
        .route("/v1/events", get(events))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/backchannel-logout", post(backchannel_logout))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see interfaces.md for the relay's API",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            relay.clone(),
            limit_and_count,
        ))
        .with_state(relay)
}

/// `{"error", "error_description"}` with `status`; never cached.
fn refuse(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    no_store(response.headers_mut());
    response
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn endpoint_name(path: Option<&str>) -> &'static str {
    match path {
        Some("/v1/token") => "token",
        Some("/v1/refresh") => "refresh",
        Some("/v1/revoke") => "revoke",
        Some("/v1/exchange") => "exchange",
        Some("/v1/events") => "events",
        Some("/.well-known/jwks.json") => "jwks",
        Some("/backchannel-logout") => "backchannel_logout",
        Some("/healthz") => "healthz",
        Some("/metrics") => "metrics",
        _ => "other",
    }
}

/// Rate limiting for the endpoints that cost something, and a count and time for every answer.
async fn limit_and_count(
    State(relay): State<Shared>,
    ConnectInfo(peer): ConnectInfo<cis2_tls::Peer>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let endpoint = endpoint_name(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    // Back-channel logout is not limited: its tokens are signature-checked, and CIS2's own calls must
    // never be refused because someone else flooded the token endpoint from the same address.
    let limited = matches!(
        endpoint,
        "token" | "refresh" | "revoke" | "exchange" | "events"
    );
    let allowed = if limited {
        relay.limiter.check(peer.0.ip())
    } else {
        Ok(())
    };
    let response = match allowed {
        Err(wait) => {
            relay.metrics.rate_limited.inc();
            let mut response = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!("too many requests from this address; try again in {wait} s"),
            );
            if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Ok(()) => next.run(request).await,
    };
    // An event stream's answer is its opening; the time it then stays open is not a latency.
    let took = if endpoint == "events" {
        Duration::ZERO
    } else {
        started.elapsed()
    };
    relay
        .metrics
        .request(endpoint, response.status().as_u16(), took);
    response
}

/// Why a request body could not be had.
enum BodyProblem {
    TooLarge(usize),
    TooSlow(u64),
    Unreadable,
}

impl BodyProblem {
    fn describe(&self) -> String {
        match self {
            BodyProblem::TooLarge(limit) => {
                format!("the request body is larger than {limit} bytes")
            }
            BodyProblem::TooSlow(secs) => {
                format!("the request body did not arrive within {secs} seconds")
            }
            BodyProblem::Unreadable => "the request body could not be read".into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            BodyProblem::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyProblem::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            BodyProblem::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// The request body, read whole within `[limits] read_timeout_secs` — so a client that sends its body a
/// byte at a time cannot hold a connection and a task for long — and no longer than `max_body_bytes`.
struct ReadBody(Result<Bytes, BodyProblem>);

impl FromRequest<Shared> for ReadBody {
    type Rejection = Infallible;

    async fn from_request(request: Request, relay: &Shared) -> Result<ReadBody, Infallible> {
        let limits = &relay.config.limits;
        let read = Bytes::from_request(request, relay);
        Ok(ReadBody(
            match tokio::time::timeout(Duration::from_secs(limits.read_timeout_secs), read).await {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    Err(BodyProblem::TooLarge(limits.max_body_bytes))
                }
                Ok(Err(_)) => Err(BodyProblem::Unreadable),
                Err(_) => Err(BodyProblem::TooSlow(limits.read_timeout_secs)),
            },
        ))
    }
}

/// The body as JSON of type `T`, or the refusal to send. Nothing of the body is quoted back.
fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: ReadBody,
) -> Result<T, Box<Response>> {
    let body = body.0.map_err(|problem| {
        Box::new(refuse(
            problem.status(),
            "invalid_request",
            &problem.describe(),
        ))
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Box::new(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "send the body as Content-Type: application/json",
        )));
    }
    serde_json::from_slice(&body).map_err(|e| {
        // serde's message names fields and positions, never values.
        let why = e.to_string();
        let why = why.split(" at line").next().unwrap_or("malformed JSON");
        Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("the body is not the expected JSON object: {why}"),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    code: Secret,
    code_verifier: Secret,
    redirect_uri: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: Secret,
}

fn bad(description: &str) -> Response {
    refuse(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
fn is_code_verifier(value: &str) -> bool {
    (43..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// A credential as a provider issues it: visible ASCII, not absurdly long.
fn is_token_text(value: &str) -> bool {
    (1..=4096).contains(&value.len()) && value.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

async fn token(State(relay): State<Shared>, headers: HeaderMap, body: ReadBody) -> Response {
    let request: TokenRequest = match json_body(&headers, body) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    if !is_token_text(request.code.expose()) {
        return bad("code must be 1 to 4096 visible ASCII characters");
    }
    if !is_code_verifier(request.code_verifier.expose()) {
        return bad("code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636)");
    }
    if !redirect_allowed(&relay.config.allowed_redirect_uris, &request.redirect_uri) {
        return bad("redirect_uri is not one this relay accepts (allowed_redirect_uris)");
    }
    let work = async {
        let metadata = relay.rp.discovery.metadata().await?;
        relay
            .rp
            .redeem_code(
                &metadata,
                &request.code,
                &request.code_verifier,
                &request.redirect_uri,
                None,
            )
            .await
    };
    answer(&relay, work).await
}

/// The `{"refresh_token"}` body of `/v1/refresh` and `/v1/revoke`, or the refusal to send.
fn refresh_request(headers: &HeaderMap, body: ReadBody) -> Result<RefreshRequest, Box<Response>> {
    let request: RefreshRequest = json_body(headers, body)?;
    if !is_token_text(request.refresh_token.expose()) {
        return Err(Box::new(bad(
            "refresh_token must be 1 to 4096 visible ASCII characters",
        )));
    }
    Ok(request)
}

async fn refresh(State(relay): State<Shared>, headers: HeaderMap, body: ReadBody) -> Response {
    let request = match refresh_request(&headers, body) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    answer(
        &relay,
        relay.rp.redeem_refresh(&request.refresh_token, None),
    )
    .await
}

/// RFC 7009 on the agent's behalf: it holds no client credential, so its sign-out revokes through here.
async fn revoke(State(relay): State<Shared>, headers: HeaderMap, body: ReadBody) -> Response {
    let request = match refresh_request(&headers, body) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    let outcome = match within_time_limit(
        &relay,
        relay.rp.revoke_refresh_token(&request.refresh_token),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(too_slow) => return *too_slow,
    };
    let mut response = match outcome {
        Ok(revoked) => axum::Json(json!({"revoked": revoked})).into_response(),
        Err(e) => {
            tracing::warn!(error = %escaped(&e), "revocation at CIS2 failed");
            refuse(
                StatusCode::BAD_GATEWAY,
                "temporarily_unavailable",
                &format!("CIS2 did not revoke the token: {e}"),
            )
        }
    };
    no_store(response.headers_mut());
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeRequest {
    id_token: Secret,
    audience: String,
}

/// RFC 8693 at the API Platform on an agent's behalf: the agent sends its live session's ID token and
/// the audience's name; the relay checks the ID token by the sign-in's rules (a token it would not have
/// accepted at sign-in is never presented as this application's), signs the client assertion with the
/// platform key only it holds and answers the platform's access token. The platform's refresh token,
/// if any, stays here unused: the agent renews by exchanging again.
async fn exchange(State(relay): State<Shared>, headers: HeaderMap, body: ReadBody) -> Response {
    let request: ExchangeRequest = match json_body(&headers, body) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    if !is_token_text(request.id_token.expose()) {
        return bad("id_token must be 1 to 4096 visible ASCII characters");
    }
    let Some((platform, key)) = relay.platforms.get(&request.audience) else {
        let mut known: Vec<&str> = relay.platforms.keys().map(String::as_str).collect();
        known.sort_unstable();
        return refuse(
            StatusCode::NOT_FOUND,
            "unknown_audience",
            &if known.is_empty() {
                "this relay exchanges for no audience ([[api_platform]] is not configured)".into()
            } else {
                format!(
                    "this relay exchanges for no audience {:?}; it knows {}",
                    request.audience,
                    known.join(", ")
                )
            },
        );
    };
    let work = async {
        relay.rp.check_id_token(&request.id_token).await?;
        let client = cis2_oidc::token_exchange::PlatformClient {
            http: relay.rp.discovery.http(),
            token_url: &platform.token_url,
            api_key: &platform.api_key,
            key,
        };
        client
            .exchange(&request.id_token, relay.clock.now())
            .await
            .map_err(SignInError::Exchange)
    };
    let outcome = match within_time_limit(&relay, work).await {
        Ok(outcome) => outcome,
        Err(too_slow) => return *too_slow,
    };
    match outcome {
        Ok((answer, took)) => {
            relay.metrics.provider(took);
            let now = relay.clock.now();
            let lifetime = answer.lifetime();
            let mut response = axum::Json(json!({
                "access_token": answer.access_token.expose(),
                "token_type": answer.token_type.as_deref().unwrap_or("Bearer"),
                "issued_token_type": answer.issued_token_type.as_deref()
                    .unwrap_or(cis2_oidc::token_exchange::ACCESS_TOKEN_TYPE),
                "expires_in": lifetime,
                "expires_at": now + lifetime,
                "audience": platform.audience,
            }))
            .into_response();
            no_store(response.headers_mut());
            response
        }
        Err(error) => {
            let (status, code) = match &error {
                // The ID token the agent sent is not one this relay accepts: the agent's to fix (sign in
                // again), not the provider's.
                SignInError::IdToken(IdTokenError::NoKeys) => {
                    (StatusCode::BAD_GATEWAY, "temporarily_unavailable")
                }
                SignInError::IdToken(_) => (StatusCode::BAD_REQUEST, "invalid_grant"),
                other => classify(other),
            };
            tracing::info!(error = %escaped(&error), status = status.as_u16(), audience = %platform.audience, "token exchange refused");
            let description = match &error {
                SignInError::Exchange(e) => {
                    format!("the API Platform refused the exchange: {e}")
                }
                other => other.to_string(),
            };
            refuse(status, code, &description)
        }
    }
}

/// Text that came from outside (a token's `kid` or `iss`, a provider's error description) made safe for
/// one log line: newlines, ANSI escapes and other control characters come out as `\n`, `\u{1b}`.
fn escaped(untrusted: &impl std::fmt::Display) -> String {
    untrusted.to_string().escape_debug().to_string()
}

/// `work`'s outcome if it ends within `[limits] request_timeout_secs`, else the 504 to answer.
async fn within_time_limit<T>(
    relay: &Relay,
    work: impl std::future::Future<Output = T>,
) -> Result<T, Box<Response>> {
    let limit = Duration::from_secs(relay.config.limits.request_timeout_secs);
    tokio::time::timeout(limit, work).await.map_err(|_| {
        tracing::warn!(secs = limit.as_secs(), "a call to CIS2 ran out of time");
        Box::new(refuse(
            StatusCode::GATEWAY_TIMEOUT,
            "temporarily_unavailable",
            &format!("CIS2 did not answer within {} seconds", limit.as_secs()),
        ))
    })
}

/// Runs an exchange within the time limit and turns its outcome into the answer.
async fn answer(
    relay: &Relay,
    work: impl std::future::Future<Output = Result<SignedIn, SignInError>>,
) -> Response {
    let outcome = match within_time_limit(relay, work).await {
        Ok(outcome) => outcome,
        Err(too_slow) => return *too_slow,
    };
    match outcome {
        Ok(signed_in) => {
            relay.metrics.provider(signed_in.provider_time);
            let now = relay.clock.now();
            let mut body = serde_json::Map::new();
            body.insert(
                "access_token".into(),
                signed_in.access_token.expose().into(),
            );
            body.insert("expires_at".into(), signed_in.expires_at.into());
            body.insert(
                "expires_in".into(),
                signed_in.expires_at.saturating_sub(now).into(),
            );
            if let Some(refresh_token) = &signed_in.refresh_token {
                body.insert("refresh_token".into(), refresh_token.expose().into());
            }
            if !signed_in.id_token.expose().is_empty() {
                body.insert("id_token".into(), signed_in.id_token.expose().into());
            }
            body.insert("sub".into(), signed_in.sub.clone().into());
            // A refresh without an ID token names no session: the agent keeps the ticket it has.
            if let Some(sid) = &signed_in.sid {
                body.insert(
                    "events_ticket".into(),
                    relay.tickets.issue(sid, &signed_in.sub, now).into(),
                );
            }
            body.insert(
                "user".into(),
                serde_json::to_value(&signed_in.user).unwrap_or_default(),
            );
            let mut response = axum::Json(serde_json::Value::Object(body)).into_response();
            no_store(response.headers_mut());
            response
        }
        Err(error) => {
            let (status, code) = classify(&error);
            tracing::info!(error = %escaped(&error), status = status.as_u16(), "exchange refused");
            refuse(status, code, &error.to_string())
        }
    }
}

/// The HTTP status and OAuth-style code for a failed exchange: the agent's fault is 400, CIS2's is 502.
fn classify(error: &SignInError) -> (StatusCode, &'static str) {
    match error {
        SignInError::Exchange(ProviderError::Status {
            status,
            oauth_error,
            ..
        }) if (400..500).contains(status) => (
            StatusCode::BAD_REQUEST,
            match oauth_error.as_deref() {
                Some("invalid_grant") => "invalid_grant",
                Some("invalid_client") | Some("unauthorized_client") => {
                    // The relay's own registration is wrong: not something the agent can fix.
                    return (StatusCode::BAD_GATEWAY, "relay_misconfigured");
                }
                _ => "invalid_request",
            },
        ),
        SignInError::RefreshRefused(_) => (StatusCode::BAD_REQUEST, "invalid_grant"),
        e if e.is_outage() => (StatusCode::BAD_GATEWAY, "temporarily_unavailable"),
        _ => (StatusCode::BAD_GATEWAY, "invalid_provider_answer"),
    }
}

async fn jwks(State(relay): State<Shared>) -> Response {
    let mut response = axum::Json(&relay.public_keys).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

async fn healthz(State(relay): State<Shared>) -> Response {
    let mut body = json!({"status": "ok"});
    if relay.fanout.uses_redis() {
        body["redis"] = relay.fanout.redis_up().into();
    }
    axum::Json(body).into_response()
}

async fn metrics(State(relay): State<Shared>) -> Response {
    let redis = relay.fanout.uses_redis().then(|| relay.fanout.redis_up());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        relay.metrics.render(redis),
    )
        .into_response()
}

async fn backchannel_logout(
    State(relay): State<Shared>,
    headers: HeaderMap,
    body: ReadBody,
) -> Response {
    let limit = Duration::from_secs(relay.config.limits.request_timeout_secs);
    let Ok(outcome) = tokio::time::timeout(limit, check_logout(&relay, &headers, body)).await
    else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the logout token could not be checked in time (CIS2's keys were slow to fetch); try again",
        );
    };
    match outcome {
        Ok(ended) => {
            relay.metrics.logout_accepted.inc();
            tracing::info!("back-channel logout accepted");
            relay.fanout.publish(ended).await;
            let mut response = StatusCode::OK.into_response();
            no_store(response.headers_mut());
            response
        }
        Err(refusal) => {
            if refusal.status() == StatusCode::BAD_REQUEST {
                relay.metrics.logout_refused.inc();
            }
            refusal
        }
    }
}

async fn check_logout(
    relay: &Relay,
    headers: &HeaderMap,
    body: ReadBody,
) -> Result<EndedSession, Response> {
    let body = body.0.map_err(|problem| bad(&problem.describe()))?;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(bad(
            "send logout_token as an application/x-www-form-urlencoded form",
        ));
    }
    let mut tokens = url::form_urlencoded::parse(&body)
        .filter(|(name, _)| name == "logout_token")
        .map(|(_, value)| value.into_owned());
    let token = match (tokens.next(), tokens.next()) {
        (Some(token), None) if !token.is_empty() => Secret::new(token),
        (Some(_), Some(_)) => return Err(bad("logout_token appears more than once")),
        _ => return Err(bad("the form has no logout_token")),
    };
    let unavailable = |what: String| {
        tracing::warn!(what = %escaped(&what), "cannot check a logout token: the provider's keys are unavailable");
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the provider's keys could not be fetched to check the logout token; try again",
        )
    };
    let metadata = relay
        .rp
        .discovery
        .metadata()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let algs = accepted_algs(&metadata);
    let expected = LogoutExpected {
        issuer: relay.rp.discovery.issuer(),
        client_id: &relay.rp.settings.client_id,
        algs: &algs,
        now: relay.clock.now(),
    };
    let checked = relay
        .rp
        .discovery
        .check_with_keys(
            |keys| validate_logout_token(token.expose(), keys, &expected),
            |e| matches!(e, LogoutTokenError::Signature(IdTokenError::UnknownKey(_))),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let ended = checked.map_err(|e| {
        tracing::info!(reason = %escaped(&e), "back-channel logout refused");
        bad(&e.to_string())
    })?;
    if let Some(jti) = cis2_jose::UnverifiedJwt::parse(token.expose())
        .ok()
        .and_then(|t| {
            t.claims
                .get("jti")
                .and_then(|j| j.as_str())
                .map(str::to_string)
        })
    {
        let now = relay.clock.now();
        let mut seen = relay
            .seen_logout_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, forget_at| *forget_at > now);
        if seen.contains_key(&jti) {
            return Err(bad("this logout token was already used (jti replayed)"));
        }
        seen.insert(jti, now + cis2_oidc::logout::MAX_LOGOUT_TOKEN_AGE_SECS + 60);
    }
    Ok(ended)
}

#[derive(Deserialize)]
struct EventsQuery {
    sid: Option<String>,
    sub: Option<String>,
}

/// How many event streams one session may hold at once: its agent's, and one more while the agent
/// reconnects before the relay has noticed the old connection is dead. A newer stream ends the oldest,
/// so a ticket cannot be used to fill the relay's slots, and a reconnecting agent is never refused.
pub const MAX_STREAMS_PER_SESSION: usize = 2;

/// The event streams open per session, oldest first; dropping an entry's sender ends that stream.
#[derive(Default)]
pub struct SessionStreams {
    next_id: u64,
    open: HashMap<String, std::collections::VecDeque<(u64, oneshot::Sender<()>)>>,
}

/// Releases a subscriber slot, and the stream's place among its session's, when the stream ends,
/// however it ends.
struct SubscriberSlot {
    relay: Shared,
    session: Option<(String, u64)>,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.relay.metrics.subscribers.dec();
        if let Some((sid, id)) = self.session.take() {
            let mut streams = self
                .relay
                .session_streams
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(open) = streams.open.get_mut(&sid) {
                open.retain(|(open_id, _)| *open_id != id);
                if open.is_empty() {
                    streams.open.remove(&sid);
                }
            }
        }
    }
}

/// A logout naming only the person ends the streams open when it happened; one caught up on late
/// (an instance back from a Redis outage) must not end a session the person started since. Allows
/// for this much difference between the clocks of Redis and the relay.
const CLOCK_ALLOWANCE_MS: u64 = 5_000;

enum Phase {
    Hello,
    EndNow,
    Listening,
    Done,
}

struct Stream {
    relay: Shared,
    sid: String,
    sub: String,
    updates: broadcast::Receiver<Ended>,
    closing: watch::Receiver<bool>,
    /// Resolves when a newer stream of the same session takes this one's place.
    replaced: oneshot::Receiver<()>,
    opened_ms: u64,
    phase: Phase,
    _slot: SubscriberSlot,
}

fn logout_event(sid: &str) -> Event {
    Event::default()
        .event("logout")
        .data(json!({"sid": sid}).to_string())
}

async fn events(
    State(relay): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return bad("the query must be ?sid=…[&sub=…]");
    };
    let printable =
        |v: &str| (1..=256).contains(&v.len()) && v.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let Some(sid) = query.sid.filter(|s| printable(s)) else {
        return bad(
            "sid is required: the CIS2 session id from the ID token (1 to 256 visible characters)",
        );
    };
    if query.sub.as_deref().is_some_and(|s| !printable(s)) {
        return bad("sub must be 1 to 256 visible characters");
    }
    let forbidden = |why: &str| refuse(StatusCode::FORBIDDEN, "invalid_ticket", why);
    // In a header, not the query: proxies and load balancers log query strings.
    let Some(ticket) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| (1..=2048).contains(&t.len()))
    else {
        return forbidden(
            "send the events_ticket that came with this session's tokens as Authorization: Bearer",
        );
    };
    let ticketed = match relay.tickets.check(ticket, relay.clock.now()) {
        Ok(ticketed) => ticketed,
        Err(why) => return forbidden(&why.to_string()),
    };
    if ticketed.sid != sid || query.sub.is_some_and(|sub| sub != ticketed.sub) {
        return forbidden("the ticket is for another session");
    }
    let open = relay.metrics.subscribers.inc();
    let mut slot = SubscriberSlot {
        relay: relay.clone(),
        session: None,
    };
    if open as usize >= relay.config.limits.max_subscribers {
        drop(slot);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "this relay holds as many event streams as it may; reconnect to another instance or later",
        );
    }
    let closing = relay.closing.subscribe();
    if *closing.borrow() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "this relay is stopping; reconnect to another instance",
        );
    }
    let (replace, replaced) = oneshot::channel();
    {
        let mut streams = relay
            .session_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let id = streams.next_id;
        streams.next_id += 1;
        let open = streams.open.entry(sid.clone()).or_default();
        while open.len() >= MAX_STREAMS_PER_SESSION {
            open.pop_front();
        }
        open.push_back((id, replace));
        slot.session = Some((sid.clone(), id));
    }
    let updates = relay.fanout.subscribe();
    let already_ended = relay.fanout.recently_ended(&sid);
    let stream = Stream {
        relay: relay.clone(),
        sid,
        sub: ticketed.sub,
        updates,
        closing,
        replaced,
        opened_ms: crate::fanout::epoch_ms(),
        phase: if already_ended {
            Phase::EndNow
        } else {
            Phase::Hello
        },
        _slot: slot,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = match stream.phase {
            Phase::Hello => {
                stream.phase = Phase::Listening;
                Event::default().event("subscribed").data("{}")
            }
            Phase::EndNow => {
                stream.phase = Phase::Done;
                stream.relay.metrics.logout_delivered.inc();
                logout_event(&stream.sid)
            }
            Phase::Listening => loop {
                let update = tokio::select! {
                    update = stream.updates.recv() => update,
                    _ = stream.closing.wait_for(|closing| *closing) => return None,
                    _ = &mut stream.replaced => return None,
                };
                match update {
                    Ok(ended)
                        if matches(&ended.session, &stream.sid, Some(&stream.sub))
                            && (ended.session.sid.is_some()
                                || ended.at_ms + CLOCK_ALLOWANCE_MS >= stream.opened_ms) =>
                    {
                        stream.phase = Phase::Done;
                        stream.relay.metrics.logout_delivered.inc();
                        break logout_event(&stream.sid);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if stream.relay.fanout.recently_ended(&stream.sid) {
                            stream.phase = Phase::EndNow;
                            break Event::default().comment("caught up");
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
            Phase::Done => return None,
        };
        Some((Ok::<Event, Infallible>(event), stream))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response();
    no_store(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_verifiers_follow_rfc_7636() {
        assert!(is_code_verifier(&"a".repeat(43)));
        assert!(is_code_verifier(&"A-._~9".repeat(20)));
        assert!(!is_code_verifier(&"a".repeat(42)));
        assert!(!is_code_verifier(&"a".repeat(129)));
        assert!(!is_code_verifier(&format!("{}+", "a".repeat(43))));
        assert!(!is_code_verifier(&format!("{} ", "a".repeat(43))));
    }

    #[test]
    fn the_agents_fault_is_400_and_the_providers_is_502() {
        let status = |status: u16, oauth: Option<&str>| {
            classify(&SignInError::Exchange(ProviderError::Status {
                what: "the provider's token endpoint".into(),
                status,
                description: None,
                oauth_error: oauth.map(str::to_string),
            }))
        };
        assert_eq!(
            status(400, Some("invalid_grant")),
            (StatusCode::BAD_REQUEST, "invalid_grant")
        );
        assert_eq!(
            status(401, Some("invalid_client")),
            (StatusCode::BAD_GATEWAY, "relay_misconfigured")
        );
        assert_eq!(
            status(500, None),
            (StatusCode::BAD_GATEWAY, "temporarily_unavailable")
        );
        assert_eq!(
            classify(&SignInError::IdToken(IdTokenError::BadSignature)),
            (StatusCode::BAD_GATEWAY, "invalid_provider_answer")
        );
    }
}
