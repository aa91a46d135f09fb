//! JSON-RPC 2.0 over lines: turning a line into a request, a request into a call on the agent, and the
//! outcome into a response. Every malformed input gets its JSON-RPC error; none ends the connection.

use crate::agent::{
    Agent, AgentError, BadParamsReason, ConnectionGrant, NotAllowedReason, TokenRequest,
};
use crate::peer::Peer;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// The methods of the protocol: the same list `[[clients]] methods` is checked against.
pub const METHODS: [&str; 9] = crate::config::CLIENT_METHODS;

/// The event types a subscriber may receive (`resync` comes from the connection, the rest from the
/// agent).
pub const EVENTS: [&str; 9] = [
    "signed_in",
    "signed_out",
    "token_refreshed",
    "role_changed",
    "session_expiring",
    "locked",
    "unlocked",
    "agent_stopping",
    "resync",
];

/// The protocol's revision, as `version` reports it. 1: the contract's first methods and events; 2:
/// `version`, `activity`, the `agent_stopping` event, error -32006 and `token`'s `lifetime_secs`.
pub const PROTOCOL_REVISION: u32 = 2;

/// The error codes this agent sends, as `version` reports them.
pub const ERROR_CODES: [i64; 12] = [
    PARSE_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    INVALID_PARAMS,
    INTERNAL_ERROR,
    -32000,
    -32001,
    -32002,
    -32003,
    -32004,
    -32005,
    -32006,
];

/// A request that passed the JSON-RPC checks.
#[derive(Debug, Clone)]
pub struct Request {
    /// `None` for a notification (no answer is sent).
    pub id: Option<Id>,
    pub method: String,
    pub params: Value,
}

/// A request's `id` exactly as the client wrote it: a string, `null`, or a number of any length (a
/// 39-digit id comes back as those 39 digits, never rounded through a float).
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// The `null` id of answers to lines whose id could not be read.
    pub fn null() -> Id {
        Id(RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is JSON")))
    }

    /// The id as the client wrote it (whitespace trimmed).
    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

#[derive(Serialize)]
struct Response<'a> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

fn response_line(response: &Response<'_>) -> String {
    serde_json::to_string(response).unwrap_or_else(|_| unreachable!("a response always serialises"))
}

/// The JSON text of an error answer (no newline).
pub fn error_response(id: &Id, code: i64, message: &str) -> String {
    response_line(&Response {
        jsonrpc: "2.0",
        id: &id.0,
        result: None,
        error: Some(json!({"code": code, "message": message})),
    })
}

/// The JSON text of a result answer (no newline).
pub fn result_response(id: &Id, result: &Value) -> String {
    response_line(&Response {
        jsonrpc: "2.0",
        id: &id.0,
        result: Some(result),
        error: None,
    })
}

/// Parses one line. `Err` is the error answer to send (JSON text).
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let null = Id::null();
    let text = std::str::from_utf8(line)
        .map_err(|_| error_response(&null, PARSE_ERROR, "The line is not UTF-8 text."))?;
    let not_json = |e: serde_json::Error| {
        error_response(&null, PARSE_ERROR, &format!("The line is not JSON: {e}."))
    };
    let raw: &RawValue = serde_json::from_str(text).map_err(not_json)?;
    let mut object = match raw.get().as_bytes().first() {
        Some(b'{') => {
            serde_json::from_str::<Members>(raw.get())
                .map_err(not_json)?
                .0
        }
        Some(b'[') => {
            return Err(error_response(
                &null,
                INVALID_REQUEST,
                "Batches are not supported: send one request object per line.",
            ));
        }
        _ => {
            return Err(error_response(
                &null,
                INVALID_REQUEST,
                "A request must be a JSON object.",
            ));
        }
    };
    let id = match object.remove("id") {
        None => None,
        Some(raw) if matches!(raw.get().as_bytes().first(), Some(b'"' | b'n')) => Some(Id(raw)),
        // Echoed digit for digit; but one beyond any float (1e999) would make the answer unreadable
        // to most JSON parsers, the client's included.
        Some(raw) if matches!(raw.get().as_bytes().first(), Some(b'-' | b'0'..=b'9')) => {
            if !raw.get().parse::<f64>().is_ok_and(f64::is_finite) {
                return Err(error_response(
                    &null,
                    INVALID_REQUEST,
                    "id is a number too large for JSON readers; send it as a string.",
                ));
            }
            Some(Id(raw))
        }
        Some(_) => {
            return Err(error_response(
                &null,
                INVALID_REQUEST,
                "id must be a string, a number or null.",
            ));
        }
    };
    let reply_id = id.clone().unwrap_or_else(Id::null);
    let member = |raw: Option<Box<RawValue>>| -> Result<Option<Value>, String> {
        raw.map(|raw| serde_json::from_str::<Strict>(raw.get()).map(|s| s.0))
            .transpose()
            .map_err(not_json)
    };
    if member(object.remove("jsonrpc"))?
        .as_ref()
        .and_then(Value::as_str)
        != Some("2.0")
    {
        return Err(error_response(
            &reply_id,
            INVALID_REQUEST,
            "jsonrpc must be \"2.0\".",
        ));
    }
    let Some(Value::String(method)) = member(object.remove("method"))? else {
        return Err(error_response(
            &reply_id,
            INVALID_REQUEST,
            "method must be a string.",
        ));
    };
    let params = match member(object.remove("params"))? {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(params @ Value::Object(_)) => params,
        Some(_) => {
            return Err(error_response(
                &reply_id,
                INVALID_PARAMS,
                "params must be an object (named parameters).",
            ));
        }
    };
    Ok(Request { id, method, params })
}

/// A JSON object's members, each kept as written; a key written twice is an error (serde_json alone
/// keeps the last, so `{"method":"status","method":"logout"}` would run `logout`).
struct Members(HashMap<String, Box<RawValue>>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = HashMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Box<RawValue>>()?;
                    if members.insert(key.clone(), value).is_some() {
                        return Err(duplicate::<A::Error>(&key));
                    }
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

fn duplicate<E: serde::de::Error>(key: &str) -> E {
    let key: String = key.chars().take(64).collect();
    E::custom(format_args!(
        "the key {key:?} appears more than once in one object"
    ))
}

/// Any JSON value, refusing a key written twice in any object at any depth.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrictVisitor;
        impl<'de> Visitor<'de> for StrictVisitor {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Strict, E> {
                Ok(Strict(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                let mut items = Vec::new();
                while let Some(Strict(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Strict(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut object = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let Strict(value) = map.next_value()?;
                    if object.contains_key(&key) {
                        return Err(duplicate::<A::Error>(&key));
                    }
                    object.insert(key, value);
                }
                Ok(Strict(Value::Object(object)))
            }
        }
        deserializer.deserialize_any(StrictVisitor)
    }
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
    serde_json::from_value(value).map_err(|e| {
        AgentError::BadParams(BadParamsReason::Malformed {
            detail: e.to_string(),
        })
    })
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
    if !crate::policy::OPEN_METHODS.contains(&method) {
        let result = match &outcome {
            Ok(_) => "ok".to_string(),
            Err(AgentError::NotAllowed { .. }) => "denied".to_string(),
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
                return Err(AgentError::BadParams(BadParamsReason::OutOfRange {
                    param: "timeout_secs",
                    min: 1,
                    max: 3600,
                }));
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
                return Err(AgentError::BadParams(BadParamsReason::Missing {
                    method: "token",
                }));
            };
            if p.min_valid_secs.is_some_and(|m| m > 86_400) {
                return Err(AgentError::BadParams(BadParamsReason::TooLarge {
                    param: "min_valid_secs",
                    max: 86_400,
                }));
            }
            if let Some(audience) = &p.audience
                && !grant.audiences.contains(audience)
            {
                return Err(AgentError::NotAllowed {
                    program: peer.describe(),
                    method: method.to_string(),
                    reason: NotAllowedReason::AudienceNotGranted {
                        audience: audience.clone(),
                        source: grant.source,
                    },
                });
            }
            if let Some(scope) = &p.scope
                && !grant.scopes.iter().any(|s| s == scope)
            {
                return Err(AgentError::NotAllowed {
                    program: peer.describe(),
                    method: method.to_string(),
                    reason: NotAllowedReason::ScopeNotGranted {
                        scope: scope.clone(),
                        source: grant.source,
                    },
                });
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
        "activity" => agent.activity().map(|a| json!(a)),
        "version" => Ok(version(agent)),
        "logout" => agent.logout().await.map(|()| json!({})),
        "subscribe" => Ok(json!({})),
        other => Err(AgentError::BadParams(BadParamsReason::NoSuchMethod(
            other.to_string(),
        ))),
    }
}

/// The `version` result: what this agent is and supports, so a client can adapt rather than guess.
fn version(agent: &Agent) -> Value {
    json!({
        "agent": "cis2-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": PROTOCOL_REVISION,
        "environment": agent.status().environment,
        "transport": if cfg!(windows) { "named_pipe" } else { "unix_socket" },
        "methods": METHODS,
        "events": EVENTS,
        "error_codes": ERROR_CODES,
        // What `token`'s `audience` can name here (API Platform tokens through the relay).
        "audiences": agent.audience_names(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(result: Result<Request, String>) -> Value {
        serde_json::from_str(&result.unwrap_err()).unwrap()
    }

    fn code(result: Result<Request, String>) -> i64 {
        answer(result)["error"]["code"].as_i64().unwrap()
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
            code(parse(br#"{"jsonrpc":"2.0","id":true,"method":"status"}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(parse(br#"{"jsonrpc":"2.0","id":1e999,"method":"status"}"#)),
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
        assert_eq!(ok.id.unwrap().as_json(), r#""a""#);
        assert_eq!(ok.params["min_valid_secs"], 30);
        assert!(
            parse(br#"{"jsonrpc":"2.0","method":"status"}"#)
                .unwrap()
                .id
                .is_none()
        );
    }

    #[test]
    fn the_id_is_echoed_in_errors_when_it_was_readable() {
        let err = answer(parse(br#"{"jsonrpc":"2.0","id":99,"method":false}"#));
        assert_eq!(err["id"], 99);
    }

    #[test]
    fn a_key_written_twice_is_refused_at_any_depth() {
        let twice = answer(parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"status","method":"logout"}"#,
        ));
        assert_eq!(twice["error"]["code"], PARSE_ERROR);
        let message = twice["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("\"method\" appears more than once"),
            "{message}"
        );
        assert_eq!(
            code(parse(
                br#"{"jsonrpc":"2.0","id":1,"method":"token","params":{"scope":"a","scope":"b"}}"#
            )),
            PARSE_ERROR
        );
        assert_eq!(
            code(parse(
                br#"{"jsonrpc":"2.0","id":1,"id":2,"method":"status"}"#
            )),
            PARSE_ERROR
        );
        // The same key in two different objects is not a repeat.
        assert!(parse(br#"{"jsonrpc":"2.0","id":1,"method":"token","params":{"scope":"s","audience":"a"}}"#).is_ok());
    }

    #[test]
    fn ids_come_back_exactly_as_written() {
        for id in [
            "123456789012345678901234567890123456789",
            "-0.000000000000000000000000000000000001",
            r#""\u00e9t\u00e9""#,
            "null",
        ] {
            let line = format!(r#"{{"jsonrpc":"2.0","id": {id} ,"method":"status"}}"#);
            let request_id = parse(line.as_bytes()).unwrap().id.unwrap();
            assert_eq!(request_id.as_json(), id);
            assert_eq!(
                result_response(&request_id, &json!({})),
                format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{}}}}"#)
            );
        }
    }
}
