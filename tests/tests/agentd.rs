//! `cis2-agentd`, `cis2ctl`, `cis2-mock-idp` and the scripted browser as processes, over the real
//! socket and real HTTP on loopback.

use cis2_jose::{Alg, SigningKey};
use cis2_system_tests::{Agent, Process, bin, ctl, json, stderr, stdout};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn sandbox_sign_in_whoami_token_logout_through_cis2ctl() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &["--sandbox"],
        &[("CIS2_TEST_ROLE", "555021935107003")],
    );

    let status = agent.ctl(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert!(stdout(&status).contains("SANDBOX"), "{}", stdout(&status));
    assert!(stdout(&status).contains("signed out"));

    let login = agent.ctl(&["login", "--json"]);
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    let login = json(&login);
    assert_eq!(login["state"], "signed_in");
    assert_eq!(login["environment"], "sandbox");
    assert_eq!(login["user"]["selected_role"]["id"], "555021935107003");
    assert_eq!(agent.browser_opened(), 1);

    let whoami = json(&agent.ctl(&["whoami", "--json"]));
    assert_eq!(whoami["uid"], "555021935107");
    assert_eq!(whoami["roles"].as_array().unwrap().len(), 3);
    let human = stdout(&agent.ctl(&["whoami"]));
    assert!(
        human.contains("General Medical Practitioner at Ashby Medical Practice"),
        "{human}"
    );

    let token = agent.ctl(&["token"]);
    assert_eq!(token.status.code(), Some(0));
    let access_token = stdout(&token).trim().to_string();
    assert!(access_token.len() >= 40);
    let token_json = json(&agent.ctl(&["token", "--json", "--min-valid", "60"]));
    assert_eq!(token_json["access_token"], access_token.as_str());
    assert_eq!(token_json["token_type"], "Bearer");
    assert!(token_json["expires_at"].as_u64().unwrap() > 0);

    // `cis2ctl login` while someone is signed in is a switch of clinician: refused (sign out
    // first), with no browser opened.
    let again = agent.ctl(&["login"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains(
            "is already signed in here. To sign in as someone else, sign out first (cis2ctl logout)"
        ),
        "{}",
        stderr(&again)
    );
    assert_eq!(agent.browser_opened(), 1);

    let logout = agent.ctl(&["logout"]);
    assert_eq!(logout.status.code(), Some(0));
    let after = agent.ctl(&["whoami"]);
    assert_eq!(
        after.status.code(),
        Some(1),
        "the agent answers with an error"
    );
    assert!(
        stderr(&after).contains("Nobody is signed in"),
        "{}",
        stderr(&after)
    );
    let token_after = agent.ctl(&["token"]);
    assert_eq!(token_after.status.code(), Some(1));
}

#[test]
fn cis2ctl_exit_codes_for_no_agent_and_bad_usage() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A client talks only through a folder of its user's that no one else can enter.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let loose = ctl(&dir.path().join("nothing.sock"), &["status"]);
    assert_eq!(loose.status.code(), Some(1));
    assert!(
        stderr(&loose).contains("is open to other users"),
        "{}",
        stderr(&loose)
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let missing = ctl(&dir.path().join("nothing.sock"), &["status"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(stderr(&missing).contains("no agent is running"));
    let usage = ctl(&dir.path().join("nothing.sock"), &["frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn the_socket_is_private_and_bad_lines_do_not_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let socket_mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    let dir_mode = std::fs::metadata(agent.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!((dir_mode, socket_mode), (0o700, 0o600));

    let mut client = cis2_ipc_client::Client::connect(&agent.socket).unwrap();
    client.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let cases: Vec<(Vec<u8>, i64)> = vec![
        (b"{not json".to_vec(), -32700),
        (vec![0xff, 0xfe, 0x7b], -32700),
        (b"[1,2]".to_vec(), -32600),
        (br#"{"jsonrpc":"2.0","id":1,"method":"fly"}"#.to_vec(), -32601),
        (br#"{"jsonrpc":"2.0","id":2,"method":"token","params":{"min_valid_secs":"soon"}}"#.to_vec(), -32602),
        (br#"{"jsonrpc":"2.0","id":3,"method":"token","params":{"min_valid_secs":1e999}}"#.to_vec(), -32700),
        (br#"{"jsonrpc":"2.0","id":4,"method":"token","params":{"min_valid_secs":18446744073709551616}}"#.to_vec(), -32602),
        (br#"{"jsonrpc":"2.0","id":5,"method":"status","params":{"surprise":true}}"#.to_vec(), -32602),
        (br#"{"jsonrpc":"2.0","id":6,"method":"whoami"}"#.to_vec(), -32001),
        (vec![b'x'; 70 * 1024], -32600),
    ];
    for (line, code) in cases {
        let answer = client.raw(&line).unwrap();
        assert_eq!(
            answer["error"]["code"],
            code,
            "{}: {answer}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10)
        );
    }
    let status = client.call("status", serde_json::json!({})).unwrap();
    assert_eq!(status["state"], "signed_out", "the connection still works");
}

#[test]
fn another_user_is_refused_even_with_the_socket_opened_up() {
    if rustix_uid() != 0 {
        eprintln!("not root: cannot run a client as another user here; CI runs this as root");
        return;
    }
    let Ok(setpriv) = which("setpriv") else {
        panic!("setpriv (util-linux) is needed to run a client as another user");
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    // Loosen everything, as a careless admin might: the peer check must still refuse.
    std::fs::set_permissions(
        agent.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
    data = s.recv(4096)
except OSError as e:
    data = b''
print("ANSWER:" + data.decode(errors="replace"))
"#;
    let output = Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = stdout(&output);
    assert!(
        text.starts_with("ANSWER:"),
        "the client ran as nobody: {text} {}",
        stderr(&output)
    );
    assert_eq!(
        text.trim(),
        "ANSWER:",
        "another uid must get nothing: {text}"
    );
    // The agent's own user's clients refuse the loosened folder (another user could have swapped the
    // socket in it), and talk again once it is private.
    let loose = agent.ctl(&["status"]);
    assert_eq!(loose.status.code(), Some(1));
    assert!(
        stderr(&loose).contains("is open to other users"),
        "{}",
        stderr(&loose)
    );
    std::fs::set_permissions(
        agent.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    assert_eq!(agent.ctl(&["status"]).status.code(), Some(0));
}

fn rustix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.exists())
        })
        .ok_or(())
}

#[test]
fn against_cis2_mock_idp_as_a_process_with_private_key_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(Alg::RS512);
    let key_path = dir.path().join("client-key.pem");
    std::fs::write(&key_path, key.to_pkcs1_pem()).unwrap();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        format!(
            "[[clients]]\nclient_id = \"123456789012.apps.national\"\nauth_method = \"private_key_jwt\"\n\
             jwks = '{}'\nredirect_uris = [\"http://127.0.0.1/callback\"]\nid_token_signed_response_alg = \"RS512\"\n",
            serde_json::json!({"keys": [key.public_jwk()]})
        ),
    )
    .unwrap();
    let mut idp_command = Command::new(bin("cis2-mock-idp"));
    idp_command.args(["--port", "0", "--clients"]).arg(&clients);
    let mut idp = Process::start(idp_command);
    let issuer = idp.wait_for("http://", Duration::from_secs(30));
    let issuer = format!("http://{issuer}");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"custom\"\n\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"123456789012.apps.national\"\n\
             acr_values = \"AAL3_ANY\"\n\n[agent]\nclient_policy = \"allow\"\n\n[provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"client-key.pem\"\nalg = \"RS512\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("CIS2_TEST_USER", "555021935108")],
    );
    let status = json(&agent.ctl(&["status", "--json"]));
    assert_eq!(status["environment"], "custom");
    let login = agent.ctl(&["login", "--json"]);
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    let user = &json(&login)["user"];
    assert_eq!(user["uid"], "555021935108");
    assert_eq!(user["selected_role"]["code"], "S8000:G8000:R8001");
    assert_eq!(user["assurance"]["acr"], "AAL3_ANY");
    // A fault at the provider: the cached token is still served.
    let first = stdout(&agent.ctl(&["token"]));
    drop(idp);
    assert_eq!(stdout(&agent.ctl(&["token"])), first);
    let _ = Value::Null;
}

#[test]
fn no_browser_prints_the_address_and_the_sign_in_completes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &["--sandbox", "--no-browser"], &[]);
    let socket = agent.socket.clone();
    let login = std::thread::spawn(move || ctl(&socket, &["login", "--json", "--timeout", "60"]));
    let url = agent.process.wait_for(
        "To sign in, open this address in a browser: ",
        Duration::from_secs(30),
    );
    // The one-time start URL of the loopback listener: no state, nonce or challenge to copy.
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/start/"),
        "{url}"
    );
    assert!(
        !url.contains("state=") && !url.contains("code_challenge"),
        "{url}"
    );
    let browser = Command::new(bin("cis2-scripted-browser"))
        .arg(&url)
        .output()
        .unwrap();
    assert!(browser.status.success(), "{}", stderr(&browser));
    let login = login.join().unwrap();
    assert_eq!(login.status.code(), Some(0), "{}", stderr(&login));
    assert_eq!(json(&login)["state"], "signed_in");
    assert_eq!(agent.browser_opened(), 0, "no browser was started");
}

#[test]
fn a_config_mistake_names_the_file_and_line_and_the_agent_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "environment = \"sandbox\"\n[agent]\nstore = \"disk\"\n",
    )
    .unwrap();
    let output = Command::new(bin("cis2-agentd"))
        .args(["--config", config.to_str().unwrap(), "--socket"])
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains(&format!("{}:3:", config.display())), "{text}");
    assert!(
        text.contains("keyring") && text.contains("memory"),
        "the fix names the choices: {text}"
    );
    assert!(!dir.path().join("s.sock").exists());
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let output = Command::new(bin("cis2-agentd"))
        .args(["--sandbox", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("another agent is already listening"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        agent.ctl(&["status"]).status.code(),
        Some(0),
        "the first agent is untouched"
    );
}

#[test]
fn sigterm_tells_subscribers_agent_stopping_before_the_connection_closes() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"subscribe\"}\n")
        .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    let subscribed: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(subscribed["result"], serde_json::json!({}));
    let killed = Command::new("kill")
        .args(["-TERM", &agent.process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let last: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        last["params"],
        serde_json::json!({"type": "agent_stopping", "session_survives": false}),
        "{last}"
    );
    assert!(lines.next().is_none(), "then the connection closes");
    let status = agent.process.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!agent.socket.exists(), "the socket file is removed");
}
