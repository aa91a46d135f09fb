//! What other programs and other users of the same computer can try against a running agent, over the
//! real socket and real HTTP: the sandbox's admin API without its secret, a program that starts another
//! one on a connection it already has, a client that never reads its answers, and one program opening
//! every connection it can.

use cis2_core::agent::{Agent, AgentOptions};
use cis2_core::browser::Browser;
use cis2_core::ipc;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

async fn sandbox_agent(dir: &Path) -> Agent {
    let text = format!(
        "environment = \"sandbox\"\n[agent]\ndata_dir = \"{}\"\n",
        dir.join("data").display()
    );
    let config = cis2_core::config::parse(&text, &dir.join("config.toml")).unwrap();
    Agent::start(AgentOptions::new(config, Browser::Print))
        .await
        .unwrap()
}

async fn serve(dir: &Path, agent: &Agent, options: ipc::ServeOptions) -> PathBuf {
    let bound = ipc::bind(&dir.join("run/agent.sock")).await.unwrap();
    let socket = bound.path().to_path_buf();
    tokio::spawn(ipc::serve(bound, agent.clone(), options));
    socket
}

#[tokio::test]
async fn the_sandbox_admin_api_needs_the_secret_only_this_user_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let agent = sandbox_agent(dir.path()).await;
    let issuer = agent.sandbox_provider().unwrap().issuer.clone();
    let admin = issuer.split("/openam").next().unwrap().to_string() + "/admin/next-token";
    let injected = r#"{"id_token_claims": {"name": "Mallory Injected (EVIL)"}}"#;
    let post = |secret: Option<String>| {
        let mut request = reqwest::Client::new()
            .post(&admin)
            .header("content-type", "application/json")
            .body(injected);
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        request.send()
    };
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(
        post(Some("a-guess".into()))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let file = cis2_core::sandbox::admin_secret_path(agent.data_dir());
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret = std::fs::read_to_string(&file).unwrap();
    assert_eq!(post(Some(secret)).await.unwrap().status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_starts_another_on_its_connection_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let agent = sandbox_agent(dir.path()).await;
    let socket = serve(dir.path(), &agent, ipc::ServeOptions::default()).await;
    // Python connects and is answered as itself; then it becomes /bin/sh on the same connection
    // (exec keeps the pid and the socket), and the shell asks again.
    let script = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
first = b""
while not first.endswith(b"\n"):
    first += s.recv(65536)
sys.stdout.write(first.decode())
sys.stdout.flush()
# The shell reads and writes fd 3. The socket may already be fd 3 (then dup2 is a no-op and would
# leave it close-on-exec), so mark fd 3 inheritable either way.
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
again = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "status"})
os.execv("/bin/sh", ["sh", "-c", "echo '" + again + "' >&3; exec cat <&3"])
"#;
    let socket_arg = socket.clone();
    let output = tokio::task::spawn_blocking(move || {
        // `timeout`: were the connection left open, the shell's `cat` would wait for ever.
        Command::new("timeout")
            .args(["30", "/usr/bin/python3", "-c", script])
            .arg(&socket_arg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n(stderr: {})",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{text}");
    assert_eq!(answers[0]["id"], 1);
    assert!(answers[0]["result"]["state"].is_string(), "{text}");
    assert_eq!(answers[1]["id"], 2);
    assert_eq!(answers[1]["error"]["code"], -32003, "{text}");
    assert!(
        answers[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer the one that connected"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let agent = sandbox_agent(dir.path()).await;
    let socket = serve(dir.path(), &agent, ipc::ServeOptions::default()).await;
    let flood_socket = socket.clone();
    let flooded = tokio::task::spawn_blocking(move || {
        let mut flood = UnixStream::connect(&flood_socket).unwrap();
        // Without the cap, the agent stops reading once its queue is full and a write blocks here.
        flood
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"status"}
"#
        .repeat(64);
        let started = Instant::now();
        loop {
            if let Err(e) = flood.write_all(&request) {
                return (e.kind(), started.elapsed());
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(
            flooded.0,
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "the flooding client was cut off, not left blocked: {flooded:?}"
    );
    let mut client = cis2_ipc_client::Client::connect(&socket).unwrap();
    assert!(client.call("status", serde_json::json!({})).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_program_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = sandbox_agent(dir.path()).await;
    let socket = serve(
        dir.path(),
        &agent,
        ipc::ServeOptions {
            max_connections: 8,
            max_connections_per_program: 3,
            ..ipc::ServeOptions::default()
        },
    )
    .await;
    let held_socket = socket.clone();
    let (held, refused) = tokio::task::spawn_blocking(move || {
        let held: Vec<cis2_ipc_client::Client> = (0..3)
            .map(|_| {
                let mut client = cis2_ipc_client::Client::connect(&held_socket).unwrap();
                client.call("status", serde_json::json!({})).unwrap();
                client
            })
            .collect();
        let mut fourth = UnixStream::connect(&held_socket).unwrap();
        fourth
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&mut fourth).read_line(&mut line).unwrap();
        (held, line)
    })
    .await
    .unwrap();
    assert!(
        refused.contains("the most one program may have"),
        "{refused}"
    );
    // The client library gives a program that reason too, not "the agent closed the connection".
    let library_socket = socket.clone();
    let from_the_library = tokio::task::spawn_blocking(move || {
        cis2_ipc_client::Client::connect(&library_socket)
            .unwrap()
            .call("status", serde_json::json!({}))
    })
    .await
    .unwrap();
    assert!(
        matches!(&from_the_library, Err(cis2_ipc_client::ClientError::Rpc { code: -32000, message }) if message.contains("the most one program may have")),
        "{from_the_library:?}"
    );
    // Another program (python) still gets in while this one holds its three.
    let other = tokio::task::spawn_blocking(move || {
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"jsonrpc":"2.0","id":7,"method":"status"}\n')
print(s.makefile().readline(), end="")
"#;
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(answer["id"], 7);
    assert!(answer["result"]["state"].is_string(), "{answer}");
    drop(held);
}
