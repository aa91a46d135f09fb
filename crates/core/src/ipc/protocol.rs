//! JSON-RPC 2.0 over lines: turning a line into a request, a request into a call on the agent, and the
//! outcome into a response. Every malformed input gets its JSON-RPC error; none ends the connection.

use crate::agent::{Agent, AgentError, ConnectionGrant, TokenRequest};
use crate::peer::Peer;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// The methods of the protocol: the same list `[[clients]] methods` is checked against.
pub const METHODS: [&str; 7] = crate::config::CLIENT_METHODS;

/// A request that passed the JSON-RPC checks.
#[derive(Debug, Clone)]
pub struct Request {
    /// `None` for a notification (no answer is sent).
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

pub fn error_response(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

pub fn result_response(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Parses one line. `Err` is the error response to send.
pub fn parse(line: &[u8]) -> Result<Request, Value> {
    let text = std::str::from_utf8(line)
        .map_err(|_| error_response(Value::Null, PARSE_ERROR, "The line is not UTF-8 text."))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        error_response(
            Value::Null,
            PARSE_ERROR,
            &format!("The line is not JSON: {e}."),
        )
    })?;
    let Value::Object(mut object) = value else {
        let message = if value.is_array() {
            "Batches are not supported: send one request object per line."
        } else {
            "A request must be a JSON object."
        };
        return Err(error_response(Value::Null, INVALID_REQUEST, message));
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err(error_response(
                Value::Null,
                INVALID_REQUEST,
                "id must be a string, a number or null.",
            ));
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(error_response(
            reply_id,
            INVALID_REQUEST,
            "jsonrpc must be \"2.0\".",
        ));
    }
    let Some(Value::String(method)) = object.remove("method") else {
        return Err(error_response(
            reply_id,
            INVALID_REQUEST,
            "method must be a string.",
        ));
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(params @ Value::Object(_)) => params,
        Some(_) => {
            return Err(error_response(
                reply_id,
                INVALID_PARAMS,
                "params must be an object (named parameters).",
            ));
        }
    };
    Ok(Request { id, method, params })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginParams {
    timeout_secs: Option<u64>,
    /// A person at the keyboard asking to sign in whoever is signed in now (cis2ctl, the GUI's button):
    /// refused while someone is signed in unless `[workstation] allow_user_switch`.
    #[serde(default)]
    switch_user: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenParams {
    min_valid_secs: Option<u64>,
    audience: Option<String>,
    scope: Option<String>,
}

fn params<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, AgentError> {
    serde_json::from_value(value).map_err(|e| AgentError::BadParams(format!("Bad params: {e}.")))
}

/// Runs a request for `peer`: checks the params and the client policy, calls the agent, and records
/// the outcome in the audit log (all but `status`). The result, or the error to answer with.
pub async fn call(
    agent: &Agent,
    peer: &Peer,
    connection: &tokio::sync::Mutex<ConnectionGrant>,
    request: &Request,
) -> Result<Value, (i64, String)> {
    let method = request.method.as_str();
    if !METHODS.contains(&method) {
        return Err((
            METHOD_NOT_FOUND,
            format!(
                "There is no method {method:?}; the methods are {}.",
                METHODS.join(", ")
            ),
        ));
    }
    // What a client asked for is recorded, but never more than a line's worth of it.
    let short = |v: &str| v.chars().take(256).collect::<String>();
    let (audience, scope) = match method {
        "token" => (
            request
                .params
                .get("audience")
                .and_then(Value::as_str)
                .map(short),
            request
                .params
                .get("scope")
                .and_then(Value::as_str)
                .map(short),
        ),
        _ => (None, None),
    };
    let outcome = run(agent, peer, connection, request).await;
    if method != "status" {
        let result = match &outcome {
            Ok(_) => "ok".to_string(),
            Err(AgentError::NotAllowed(_)) => "denied".to_string(),
            Err(e) => format!("error {}", e.code()),
        };
        // Nothing is handed out that the log does not hold (group commit: this waits for the write).
        if let Err(e) = agent.audit(peer, method, audience, scope, result).await
            && outcome.is_ok()
        {
            return Err((
                INTERNAL_ERROR,
                format!(
                    "{e}; nothing is handed out until it can be recorded. Check the agent's data folder (disk full? permissions?)."
                ),
            ));
        }
    }
    outcome.map_err(|e| (e.code(), e.to_string()))
}

async fn run(
    agent: &Agent,
    peer: &Peer,
    connection: &tokio::sync::Mutex<ConnectionGrant>,
    request: &Request,
) -> Result<Value, AgentError> {
    let method = request.method.as_str();
    // Params are checked first: a malformed request is -32602 whoever sends it.
    let mut token_params = None;
    let mut login_timeout = None;
    let mut switch_user = false;
    match method {
        "token" => token_params = Some(params::<TokenParams>(request.params.clone())?),
        "login" => {
            let p = params::<LoginParams>(request.params.clone())?;
            if p.timeout_secs.is_some_and(|t| t == 0 || t > 3600) {
                return Err(AgentError::BadParams(
                    "timeout_secs must be between 1 and 3600.".into(),
                ));
            }
            login_timeout = p.timeout_secs.map(Duration::from_secs);
            switch_user = p.switch_user;
        }
        _ => {
            params::<NoParams>(request.params.clone())?;
        }
    }
    let grant = agent
        .authorize(peer, method, &mut *connection.lock().await)
        .await?;
    match method {
        "status" => {
            let mut status = agent.status();
            if !agent.may_see_user(peer) {
                status.user = None;
            }
            Ok(json!(status))
        }
        "whoami" => agent.whoami().map(|u| json!(u)),
        "login" if switch_user => agent
            .login_at_the_keyboard(login_timeout)
            .await
            .map(|s| json!(s)),
        "login" => agent.login(login_timeout).await.map(|s| json!(s)),
        "token" => {
            let Some(p) = token_params else {
                return Err(AgentError::BadParams("token params are missing.".into()));
            };
            if p.min_valid_secs.is_some_and(|m| m > 86_400) {
                return Err(AgentError::BadParams(
                    "min_valid_secs must be at most 86400.".into(),
                ));
            }
            if let Some(audience) = &p.audience
                && !grant.audiences.contains(audience)
            {
                return Err(AgentError::NotAllowed(format!(
                    "{} may not ask for tokens for audience {audience:?} ({}).",
                    peer.describe(),
                    grant.source
                )));
            }
            if let Some(scope) = &p.scope
                && !grant.scopes.iter().any(|s| s == scope)
            {
                return Err(AgentError::NotAllowed(format!(
                    "{} may not ask for scope {scope:?} ({}).",
                    peer.describe(),
                    grant.source
                )));
            }
            let answer = agent
                .token(TokenRequest {
                    min_valid_secs: p.min_valid_secs,
                    audience: p.audience,
                    scope: p.scope,
                })
                .await
                .map(|t| json!(t));
            crate::agent::test_pause_token().await;
            answer
        }
        "change_role" => agent.change_role().await.map(|u| json!(u)),
        "logout" => agent.logout().await.map(|()| json!({})),
        "subscribe" => Ok(json!({})),
        other => Err(AgentError::BadParams(format!(
            "There is no method {other:?}."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: Result<Request, Value>) -> i64 {
        result.unwrap_err()["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn malformed_lines_get_their_json_rpc_errors() {
        assert_eq!(code(parse(b"{not json")), PARSE_ERROR);
        assert_eq!(code(parse(&[0xff, 0xfe, b'{'])), PARSE_ERROR);
        assert_eq!(code(parse(b"[]")), INVALID_REQUEST);
        assert_eq!(code(parse(b"42")), INVALID_REQUEST);
        assert_eq!(
            code(parse(br#"{"jsonrpc":"1.0","id":1,"method":"status"}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(parse(br#"{"jsonrpc":"2.0","id":1,"method":7}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(parse(br#"{"jsonrpc":"2.0","id":{},"method":"status"}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(parse(
                br#"{"jsonrpc":"2.0","id":1,"method":"status","params":[1]}"#
            )),
            INVALID_PARAMS
        );
        let ok =
            parse(br#"{"jsonrpc":"2.0","id":"a","method":"token","params":{"min_valid_secs":30}}"#)
                .unwrap();
        assert_eq!(ok.id, Some(json!("a")));
        assert!(
            parse(br#"{"jsonrpc":"2.0","method":"status"}"#)
                .unwrap()
                .id
                .is_none()
        );
    }

    #[test]
    fn the_id_is_echoed_in_errors_when_it_was_readable() {
        let err = parse(br#"{"jsonrpc":"2.0","id":99,"method":false}"#).unwrap_err();
        assert_eq!(err["id"], 99);
    }
}
