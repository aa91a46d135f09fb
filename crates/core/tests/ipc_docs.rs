//! Every example exchange in docs/ipc.md (`>>` a request, `<<` what came back) is run here against a
//! sandbox agent over its real socket, and what comes back is compared with the docs, so that they
//! cannot drift. Each fenced block with a `>>` line is preceded by a directive, an HTML comment the
//! rendered page does not show, saying what state to put the agent in:
//!
//! `<!-- exchange: signed_out | signed_in | locked [; browser: role=ID | uid=UID | cancel] -->`, or
//! `<!-- exchange: not run: WHY -->` for the few that need another agent (the reason is printed).
//!
//! What differs from run to run is compared by type only, as docs/ipc.md says: times (`expires_at`,
//! `auth_time`, `acts_at`), `access_token`, `lifetime_secs`, a program's path and pid in a message
//! (`/path (pid N)`) and durations measured at run time (`(3600 s)`). `{…}` and `[…]` in the docs stand
//! for a part left out.

use cis2_core::agent::{Agent, AgentOptions, SessionState};
use cis2_core::browser::Browser;
use cis2_core::clock::TestClock;
use cis2_core::config::Config;
use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const AMELIA: &str = "555021935107";
const VARYING: [&str; 5] = [
    "expires_at",
    "auth_time",
    "acts_at",
    "access_token",
    "lifetime_secs",
];

struct Block {
    /// The line of the opening fence, for messages.
    line: usize,
    directive: String,
    /// Each request with the lines that came back for it.
    exchanges: Vec<(String, Vec<String>)>,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut directive: Option<String> = None;
    let mut in_fence: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        if let Some(block) = in_fence.as_mut() {
            if line.trim_start().starts_with("```") {
                let block = in_fence.take().unwrap_or_else(|| unreachable!());
                if !block.exchanges.is_empty() {
                    found.push(block);
                }
                directive = None;
            } else if let Some(request) = line.strip_prefix(">> ") {
                block.exchanges.push((request.to_string(), Vec::new()));
            } else if let Some(answer) = line.strip_prefix("<< ")
                && let Some((_, answers)) = block.exchanges.last_mut()
            {
                answers.push(answer.to_string());
            }
            continue;
        }
        if let Some(rest) = line.trim().strip_prefix("<!-- exchange:") {
            directive = Some(rest.trim_end_matches("-->").trim().to_string());
        } else if line.starts_with("```") {
            in_fence = Some(Block {
                line: i + 1,
                directive: directive.clone().unwrap_or_default(),
                exchanges: Vec::new(),
            });
        }
    }
    found
}

/// The docs' text of an answer as JSON, with `{…}`/`[…]` left-out parts as `"<any>"`.
fn expected_json(text: &str) -> Value {
    let left_out = regex::Regex::new(r"\{…[^{}]*\}|\[…[^\[\]]*\]").unwrap();
    let text = left_out.replace_all(text, "\"<any>\"");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn normalised(text: &str) -> String {
    let program = regex::Regex::new(r"(/\S+|an unidentified program) \(pid \d+\)").unwrap();
    let seconds = regex::Regex::new(r"\(\d+ s\)").unwrap();
    let text = program.replace_all(text, "PROGRAM (pid N)");
    seconds.replace_all(&text, "(N s)").into_owned()
}

/// Where `actual` differs from `expected`, if it does.
fn differs(expected: &Value, actual: &Value, at: &str) -> Option<String> {
    if expected == "<any>" {
        return None;
    }
    let key = at.rsplit('.').next().unwrap_or_default();
    if VARYING.contains(&key) {
        let same_kind = std::mem::discriminant(expected) == std::mem::discriminant(actual)
            || (expected.is_number() && actual.is_number());
        return (!same_kind).then(|| format!("{at}: {actual} is not of the kind of {expected}"));
    }
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut ek: Vec<_> = e.keys().collect();
            let mut ak: Vec<_> = a.keys().collect();
            ek.sort();
            ak.sort();
            if ek != ak {
                return Some(format!("{at}: keys {ak:?}, the docs say {ek:?}"));
            }
            e.iter()
                .find_map(|(k, v)| differs(v, &a[k], &format!("{at}.{k}")))
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => e
            .iter()
            .zip(a)
            .enumerate()
            .find_map(|(i, (e, a))| differs(e, a, &format!("{at}[{i}]"))),
        (Value::String(e), Value::String(a)) if normalised(e) == normalised(a) => None,
        (e, a) if e == a => None,
        (e, a) => Some(format!("{at}: the agent sent {a}, the docs say {e}")),
    }
}

struct Sandbox {
    agent: Agent,
    clock: TestClock,
    script: Arc<Mutex<Script>>,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::sandbox();
    config.agent.data_dir = Some(dir.path().join("data"));
    let script = Arc::new(Mutex::new(Script::new(AMELIA, "smartcard")));
    let browser = {
        let script = script.clone();
        Browser::Callback(Arc::new(move |url: &str| {
            let (url, script) = (url.to_string(), script.lock().unwrap().clone());
            tokio::spawn(async move {
                let _ = ScriptedBrowser::default().sign_in(&url, &script).await;
            });
        }))
    };
    let clock = TestClock::default();
    let agent = Agent::start(AgentOptions {
        clock: Arc::new(clock.clone()),
        ..AgentOptions::new(config, browser)
    })
    .await
    .unwrap();
    let socket = dir.path().join("run").join("agent.sock");
    let bound = cis2_core::ipc::bind(&socket).await.unwrap();
    tokio::spawn(cis2_core::ipc::serve(
        bound,
        agent.clone(),
        cis2_core::ipc::ServeOptions::default(),
    ));
    Sandbox {
        agent,
        clock,
        script,
        socket,
        _dir: dir,
    }
}

impl Sandbox {
    /// Puts the agent in the state the directive names; `false` for a block not run.
    async fn prepare(&self, directive: &str) -> bool {
        let mut parts = directive.split(';').map(str::trim);
        let state = parts.next().unwrap_or_default();
        if let Some(why) = state.strip_prefix("not run:") {
            eprintln!("not run: {}", why.trim());
            return false;
        }
        *self.script.lock().unwrap() = Script::new(AMELIA, "smartcard");
        self.agent.logout().await.unwrap();
        match state {
            "signed_out" => {}
            "signed_in" | "locked" => {
                self.agent
                    .login(Some(Duration::from_secs(30)))
                    .await
                    .unwrap();
                if state == "locked" {
                    let idle = self.agent.config().session.inactivity_secs as i64 + 1;
                    self.clock.advance(idle);
                    if let Some(provider) = self.agent.sandbox_provider() {
                        provider.provider.advance_clock(idle);
                    }
                    while self.agent.status().state != SessionState::Locked {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            other => panic!("unknown state {other:?} in an exchange directive"),
        }
        for part in parts {
            let mut script = self.script.lock().unwrap();
            match part.strip_prefix("browser:").map(str::trim) {
                Some("cancel") => script.cancel = true,
                Some(b) if b.starts_with("role=") => script.role = Some(b[5..].to_string()),
                Some(b) if b.starts_with("uid=") => script.uid = b[4..].to_string(),
                _ => panic!("unknown part {part:?} in an exchange directive"),
            }
        }
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_in_the_ipc_docs_is_what_the_agent_does() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ipc.md")).unwrap();
    let blocks = blocks(&doc);
    assert!(blocks.len() >= 15, "found {} blocks", blocks.len());
    let sandbox = sandbox().await;
    let mut run = 0;
    let mut failures = Vec::new();
    for block in &blocks {
        assert!(
            !block.directive.is_empty(),
            "docs/ipc.md:{}: an exchange without a directive; put <!-- exchange: signed_out --> (or signed_in, locked, \"not run: why\") above it",
            block.line
        );
        if !sandbox.prepare(&block.directive).await {
            continue;
        }
        let stream = UnixStream::connect(&sandbox.socket).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let wants_events = block
            .exchanges
            .iter()
            .flat_map(|(_, answers)| answers)
            .any(|a| a.contains(r#""method":"event""#));
        if wants_events {
            write
                .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"setup\",\"method\":\"subscribe\"}\n")
                .await
                .unwrap();
            lines.next_line().await.unwrap();
        }
        for (request, answers) in &block.exchanges {
            run += 1;
            write
                .write_all(format!("{request}\n").as_bytes())
                .await
                .unwrap();
            let mut expected: Vec<Value> = answers.iter().map(|a| expected_json(a)).collect();
            while !expected.is_empty() {
                let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("docs/ipc.md:{}: no answer to {request}", block.line)
                    })
                    .unwrap()
                    .unwrap_or_else(|| panic!("the agent closed the connection after {request}"));
                let actual: Value = serde_json::from_str(&line).unwrap();
                match expected
                    .iter()
                    .position(|e| differs(e, &actual, "").is_none())
                {
                    Some(i) => {
                        expected.remove(i);
                    }
                    // Other events (a token renewed meanwhile) are not part of the example.
                    None if actual["method"] == "event" => {}
                    None => {
                        let why = expected
                            .iter()
                            .filter_map(|e| differs(e, &actual, ""))
                            .collect::<Vec<_>>()
                            .join("; ");
                        failures.push(format!(
                            "docs/ipc.md:{}: {request}\n  got  {line}\n  {why}",
                            block.line
                        ));
                        break;
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(run >= 20, "only {run} exchanges ran");
}

#[test]
fn the_comparison_tells_a_real_difference_from_what_varies() {
    let documented = expected_json(
        r#"{"id":4,"jsonrpc":"2.0","result":{"access_token":"abc","expires_at":1796089461,"lifetime_secs":3600,"token_type":"Bearer","user":{…the User…}}}"#,
    );
    let same: Value = serde_json::from_str(
        r#"{"id":4,"jsonrpc":"2.0","result":{"access_token":"xyz","expires_at":1,"lifetime_secs":3599,"token_type":"Bearer","user":{"uid":"1"}}}"#,
    )
    .unwrap();
    assert_eq!(differs(&documented, &same, ""), None);
    for changed in [
        r#"{"id":5,"jsonrpc":"2.0","result":{"access_token":"xyz","expires_at":1,"lifetime_secs":1,"token_type":"Bearer","user":{}}}"#,
        r#"{"id":4,"jsonrpc":"2.0","result":{"access_token":"xyz","expires_at":1,"lifetime_secs":1,"token_type":"DPoP","user":{}}}"#,
        r#"{"id":4,"jsonrpc":"2.0","result":{"access_token":"xyz","expires_at":null,"lifetime_secs":1,"token_type":"Bearer","user":{}}}"#,
        r#"{"id":4,"jsonrpc":"2.0","result":{"access_token":"xyz","expires_at":1,"token_type":"Bearer","user":{}}}"#,
    ] {
        let changed: Value = serde_json::from_str(changed).unwrap();
        assert!(differs(&documented, &changed, "").is_some(), "{changed}");
    }
    let message = |text: &str| Value::String(text.into());
    assert_eq!(
        differs(
            &message("/usr/bin/python3.11 (pid 3183) may not ask (3600 s)"),
            &message("/work/target/debug/deps/ipc_docs-1 (pid 7) may not ask (3599 s)"),
            "",
        ),
        None
    );
    assert!(differs(&message("may not ask"), &message("may ask"), "").is_some());
}
