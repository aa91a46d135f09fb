//! JSON-RPC 2.0 over lines: turning a line into a request, a request into a call on the agent, and the
//! outcome into a response. Every malformed input gets its JSON-RPC error; none ends the connection.

use crate::agent::{Agent, AgentError, TokenRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;

pub const METHODS: [&str; 6] = ["status", "login", "whoami", "token", "logout", "subscribe"];

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

/// Runs a request's method on the agent: the result, or the error to answer with.
pub async fn call(agent: &Agent, request: &Request) -> Result<Value, (i64, String)> {
    let outcome = match request.method.as_str() {
        "status" => params::<NoParams>(request.params.clone()).map(|_| json!(agent.status())),
        "whoami" => match params::<NoParams>(request.params.clone()) {
            Ok(_) => agent.whoami().map(|u| json!(u)),
            Err(e) => Err(e),
        },
        "login" => match params::<LoginParams>(request.params.clone()) {
            Ok(LoginParams {
                timeout_secs: Some(t),
            }) if t == 0 || t > 3600 => Err(AgentError::BadParams(
                "timeout_secs must be between 1 and 3600.".into(),
            )),
            Ok(p) => agent
                .login(p.timeout_secs.map(Duration::from_secs))
                .await
                .map(|s| json!(s)),
            Err(e) => Err(e),
        },
        "token" => match params::<TokenParams>(request.params.clone()) {
            Ok(TokenParams {
                min_valid_secs: Some(m),
                ..
            }) if m > 86_400 => Err(AgentError::BadParams(
                "min_valid_secs must be at most 86400.".into(),
            )),
            Ok(p) => agent
                .token(TokenRequest {
                    min_valid_secs: p.min_valid_secs,
                    audience: p.audience,
                    scope: p.scope,
                })
                .await
                .map(|t| json!(t)),
            Err(e) => Err(e),
        },
        "logout" => match params::<NoParams>(request.params.clone()) {
            Ok(_) => agent.logout().await.map(|()| json!({})),
            Err(e) => Err(e),
        },
        "subscribe" => params::<NoParams>(request.params.clone()).map(|_| json!({})),
        other => {
            return Err((
                METHOD_NOT_FOUND,
                format!(
                    "There is no method {other:?}; the methods are {}.",
                    METHODS.join(", ")
                ),
            ));
        }
    };
    outcome.map_err(|e| (e.code(), e.to_string()))
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
