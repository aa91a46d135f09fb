//! The provider's HTTP surface: CIS2's endpoints under the realm path, the sandbox's pages, and the
//! loopback-only admin API that tests use to rotate keys, inject faults and script the next token.

use crate::model::Client;
use crate::pages;
use crate::provider::{
    FaultMode, FaultRequest, FaultTarget, FlowStep, OAuthError, Provider, REALM_PATH, SSO_COOKIE,
    TokenExpectation,
};
use crate::tls::Peer;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<Provider>>;

pub fn router(provider: Arc<Provider>, admin_secret: Option<String>) -> Router {
    let realm = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/authorize", get(authorize))
        .route("/access_token", post(token))
        .route("/userinfo", get(userinfo).post(userinfo))
        .route("/connect/jwk_uri", get(jwks))
        .route("/connect/endSession", get(end_session))
        .route("/token/revoke", post(revoke));
    let admin = Router::new()
        .route("/keys", get(admin_keys))
        .route("/keys/next", post(admin_key_next))
        .route("/keys/activate", post(admin_key_activate))
        .route("/keys/retire", post(admin_key_retire))
        .route("/faults", post(admin_faults))
        .route("/users/{uid}/revoke", post(admin_revoke_user))
        .route("/backchannel-logout", post(admin_backchannel_logout))
        .route("/deliveries", get(admin_deliveries))
        .route("/clients", post(admin_register_client))
        .route("/next-token", post(admin_next_token))
        .route("/clock", post(admin_clock))
        .route_layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let refused = admin_secret_refused(admin_secret.as_deref(), request.headers());
                async move {
                    match refused {
                        Some(refused) => refused,
                        None => next.run(request).await,
                    }
                }
            },
        ));
    Router::new()
        .nest(REALM_PATH, realm)
        .route("/oauth2/token", post(api_token))
        .route("/sandbox/login", post(login))
        .route("/sandbox/select-role", post(select_role))
        .nest("/admin", admin)
        .fallback(not_found)
        .with_state(provider)
}

/// Splits `a=1&b=2`, refusing repeated parameters (RFC 6749 §3.1).
fn single_valued(encoded: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut params = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(encoded) {
        if params.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("the parameter {k} was sent more than once"));
        }
    }
    Ok(params)
}

fn oauth_error(err: OAuthError) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (
        status,
        no_store(),
        axum::Json(json!({"error": err.error, "error_description": err.description})),
    )
        .into_response();
    if err.status == 401 {
        let challenge = if err.error == "invalid_client" {
            "Basic realm=\"token\"".to_string()
        } else {
            format!("Bearer error=\"{}\"", err.error)
        };
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

/// Applies the fault injected for `target`: `Err` is the answer to give instead; `Ok(Some(d))` means
/// serve normally but hold the answer `d` (a slow provider: the work is done, the reply is late).
async fn fault(provider: &Provider, target: FaultTarget) -> Result<Option<Duration>, Response> {
    match provider.take_fault(target) {
        (FaultMode::None, _) => Ok(None),
        (FaultMode::Delay, ms) => Ok(Some(Duration::from_millis(ms))),
        (FaultMode::Error500, _) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "server_error", "error_description": "injected fault"})),
        )
            .into_response()),
        (FaultMode::Hang, _) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
        (FaultMode::Malformed, _) => Err((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"access_token\": \"abc\", \"token_type\": ",
        )
            .into_response()),
    }
}

/// Holds an answer as long as a `delay` fault asks.
async fn late(delay: Option<Duration>, response: Response) -> Response {
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SSO_COOKIE)
        .map(|(_, value)| value.to_string())
}

fn flow_response(step: FlowStep) -> Response {
    let (mut response, cookie) = match step {
        FlowStep::ErrorPage { status, message } => (
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                Html(pages::error_page(&message)),
            )
                .into_response(),
            None,
        ),
        FlowStep::Redirect {
            location,
            set_session,
        } => (
            (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
            set_session,
        ),
        FlowStep::Login {
            pending,
            users,
            offered,
            error,
        } => (
            Html(pages::login_page(
                &pending,
                &users,
                &offered,
                error.as_deref(),
            ))
            .into_response(),
            None,
        ),
        FlowStep::SelectRole {
            pending,
            user,
            set_session,
        } => (
            Html(pages::role_page(&pending, &user)).into_response(),
            set_session,
        ),
    };
    if let Some(cookie) = cookie
        && let Ok(value) = HeaderValue::from_str(&format!(
            "{SSO_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Lax"
        ))
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn discovery(State(provider): Shared) -> Response {
    match fault(&provider, FaultTarget::Discovery).await {
        Ok(delay) => late(delay, axum::Json(provider.discovery()).into_response()).await,
        Err(response) => response,
    }
}

async fn jwks(State(provider): Shared) -> Response {
    match fault(&provider, FaultTarget::Jwks).await {
        Ok(delay) => late(delay, axum::Json(provider.jwks()).into_response()).await,
        Err(response) => response,
    }
}

async fn authorize(
    State(provider): Shared,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = match single_valued(query.unwrap_or_default().as_bytes()) {
        Ok(params) => params,
        Err(message) => {
            return flow_response(FlowStep::ErrorPage {
                status: 400,
                message,
            });
        }
    };
    flow_response(provider.authorize(&params, session_cookie(&headers).as_deref()))
}

async fn login(State(provider): Shared, body: Bytes) -> Response {
    match single_valued(&body) {
        Ok(form) => flow_response(provider.login(&form)),
        Err(message) => flow_response(FlowStep::ErrorPage {
            status: 400,
            message,
        }),
    }
}

async fn select_role(State(provider): Shared, body: Bytes) -> Response {
    match single_valued(&body) {
        Ok(form) => flow_response(provider.select_role(&form)),
        Err(message) => flow_response(FlowStep::ErrorPage {
            status: 400,
            message,
        }),
    }
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

async fn token(State(provider): Shared, headers: HeaderMap, body: Bytes) -> Response {
    match fault(&provider, FaultTarget::Token).await {
        Ok(delay) => late(delay, token_answer(&provider, &headers, &body).await).await,
        Err(response) => response,
    }
}

async fn token_answer(provider: &Provider, headers: &HeaderMap, body: &Bytes) -> Response {
    if !is_form(headers) {
        return oauth_error(OAuthError::new(
            400,
            "invalid_request",
            "the token request must be application/x-www-form-urlencoded",
        ));
    }
    let form = match single_valued(body) {
        Ok(form) => form,
        Err(message) => return oauth_error(OAuthError::new(400, "invalid_request", message)),
    };
    match provider.token(&form).await {
        Ok(body) => (no_store(), axum::Json(body)).into_response(),
        Err(err) => oauth_error(err),
    }
}

/// The API-Platform-like token exchange (`Provider::api_exchange`).
async fn api_token(State(provider): Shared, headers: HeaderMap, body: Bytes) -> Response {
    if !is_form(&headers) {
        return oauth_error(OAuthError::new(
            400,
            "invalid_request",
            "the token request must be application/x-www-form-urlencoded",
        ));
    }
    let form = match single_valued(&body) {
        Ok(form) => form,
        Err(message) => return oauth_error(OAuthError::new(400, "invalid_request", message)),
    };
    match provider.api_exchange(&form).await {
        Ok(body) => (no_store(), axum::Json(body)).into_response(),
        Err(err) => oauth_error(err),
    }
}

async fn userinfo(State(provider): Shared, headers: HeaderMap) -> Response {
    match fault(&provider, FaultTarget::Userinfo).await {
        Ok(delay) => late(delay, userinfo_answer(&provider, &headers)).await,
        Err(response) => response,
    }
}

fn userinfo_answer(provider: &Provider, headers: &HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match provider.userinfo(bearer) {
        Ok(claims) => (no_store(), axum::Json(claims)).into_response(),
        Err(err) => oauth_error(err),
    }
}

async fn revoke(State(provider): Shared, headers: HeaderMap, body: Bytes) -> Response {
    if !is_form(&headers) {
        return oauth_error(OAuthError::new(400, "invalid_request", "send a form body"));
    }
    let form = match single_valued(&body) {
        Ok(form) => form,
        Err(message) => return oauth_error(OAuthError::new(400, "invalid_request", message)),
    };
    match provider.revoke(&form).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => oauth_error(err),
    }
}

async fn end_session(
    State(provider): Shared,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let params = match single_valued(query.unwrap_or_default().as_bytes()) {
        Ok(params) => params,
        Err(message) => {
            return flow_response(FlowStep::ErrorPage {
                status: 400,
                message,
            });
        }
    };
    match provider
        .end_session(&params, session_cookie(&headers).as_deref())
        .await
    {
        Ok(Some(location)) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        Ok(None) => Html(pages::signed_out_page()).into_response(),
        Err(message) => {
            (StatusCode::BAD_REQUEST, Html(pages::error_page(&message))).into_response()
        }
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": "not_found", "error_description": "no such endpoint"})),
    )
        .into_response()
}

// ---- admin (loopback only) ------------------------------------------------------------------------

fn admin_refused(peer: SocketAddr) -> Option<Response> {
    (!peer.ip().is_loopback()).then(|| {
        (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": "forbidden", "error_description": "the admin API answers loopback only"})),
        )
            .into_response()
    })
}

/// `Some(401)` unless the request carries the admin secret (when there is one) as a bearer token.
fn admin_secret_refused(secret: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    use sha2::{Digest, Sha256};
    let secret = secret?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compared as digests, so the time taken says nothing about how much of the secret was right.
    if Sha256::digest(presented.as_bytes()) == Sha256::digest(secret.as_bytes()) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "unauthorized", "error_description": "the admin API needs its secret: Authorization: Bearer <the contents of the admin secret file>"})),
        )
            .into_response(),
    )
}

fn admin_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn bad_admin_request(why: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "invalid_request", "error_description": why})),
    )
        .into_response()
}

macro_rules! loopback_only {
    ($peer:expr) => {
        if let Some(refused) = admin_refused($peer) {
            return refused;
        }
    };
}

async fn admin_keys(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
) -> Response {
    loopback_only!(peer);
    axum::Json(provider.keys()).into_response()
}

async fn admin_key_next(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
) -> Response {
    loopback_only!(peer);
    axum::Json(provider.add_next_key()).into_response()
}

async fn admin_key_activate(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
) -> Response {
    loopback_only!(peer);
    match provider.activate_next_key() {
        Ok(info) => axum::Json(info).into_response(),
        Err(why) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"error": "no_next_key", "error_description": why})),
        )
            .into_response(),
    }
}

async fn admin_key_retire(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
) -> Response {
    loopback_only!(peer);
    axum::Json(json!({"retired": provider.retire_previous_keys()})).into_response()
}

async fn admin_faults(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    loopback_only!(peer);
    match admin_json::<FaultRequest>(&body) {
        Ok(request) => {
            provider.set_fault(request);
            axum::Json(json!({})).into_response()
        }
        Err(why) => bad_admin_request(why),
    }
}

async fn admin_revoke_user(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(uid): Path<String>,
) -> Response {
    loopback_only!(peer);
    match provider.revoke_user(&uid) {
        Ok(count) => axum::Json(json!({"revoked_tokens": count})).into_response(),
        Err(why) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "not_found", "error_description": why})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutRequest {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    sid: Option<String>,
}

async fn admin_backchannel_logout(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    loopback_only!(peer);
    let request: LogoutRequest = match admin_json(&body) {
        Ok(r) => r,
        Err(why) => return bad_admin_request(why),
    };
    if request.sub.is_none() && request.sid.is_none() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request", "error_description": "give sub or sid"})),
        )
            .into_response();
    }
    let deliveries = provider
        .logout_sessions(request.sub.as_deref(), request.sid.as_deref())
        .await;
    axum::Json(json!({"deliveries": deliveries})).into_response()
}

async fn admin_deliveries(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
) -> Response {
    loopback_only!(peer);
    axum::Json(provider.deliveries()).into_response()
}

async fn admin_register_client(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    loopback_only!(peer);
    let client: Client = match admin_json(&body) {
        Ok(c) => c,
        Err(why) => return bad_admin_request(why),
    };
    match provider.register_client(client) {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(why) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_client_metadata", "error_description": why})),
        )
            .into_response(),
    }
}

async fn admin_next_token(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    loopback_only!(peer);
    match admin_json::<TokenExpectation>(&body) {
        Ok(expectation) => {
            provider.expect_next_token(expectation);
            axum::Json(json!({})).into_response()
        }
        Err(why) => bad_admin_request(why),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockRequest {
    advance_secs: i64,
}

async fn admin_clock(
    State(provider): Shared,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    loopback_only!(peer);
    match admin_json::<ClockRequest>(&body) {
        Ok(request) => {
            let now = provider.advance_clock(request.advance_secs);
            axum::Json(json!({"now": now})).into_response()
        }
        Err(why) => bad_admin_request(why),
    }
}
