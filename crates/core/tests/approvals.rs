//! The "ask" policy with a person to ask (what the desktop app's prompt will be): Allow once, Always
//! allow and Deny, over the real socket, with the program identified by its executable's hash.

use cis2_core::agent::{Agent, AgentOptions};
use cis2_core::browser::Browser;
use cis2_core::ipc;
use cis2_core::peer::Peer;
use cis2_core::policy::{self, Answer, Approver};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

struct Scripted {
    answers: Mutex<VecDeque<Answer>>,
    asked: AtomicUsize,
    who: Mutex<Vec<Peer>>,
}

#[async_trait::async_trait]
impl Approver for Scripted {
    async fn ask(&self, peer: &Peer) -> Answer {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.who.lock().unwrap().push(peer.clone());
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .expect("an answer for every question")
    }
}

fn token_code(socket: &std::path::Path, calls: usize) -> Vec<i64> {
    let mut client = cis2_ipc_client::Client::connect(socket).unwrap();
    (0..calls)
        .map(|_| match client.call("token", serde_json::json!({})) {
            Err(cis2_ipc_client::ClientError::Rpc { code, .. }) => code,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_once_always_allow_and_deny() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "environment = \"sandbox\"\n[agent]\nclient_policy = \"ask\"\ndata_dir = \"{}\"\n",
        dir.path().join("data").display()
    );
    let config = cis2_core::config::parse(&text, &dir.path().join("config.toml")).unwrap();
    let approver = Arc::new(Scripted {
        answers: Mutex::new([Answer::AllowOnce, Answer::AlwaysAllow, Answer::Deny].into()),
        asked: AtomicUsize::new(0),
        who: Mutex::new(Vec::new()),
    });
    let agent = Agent::start(AgentOptions {
        approver: Some(approver.clone()),
        ..AgentOptions::new(config, Browser::Print)
    })
    .await
    .unwrap();
    let bound = ipc::bind(&dir.path().join("run/agent.sock")).await.unwrap();
    let socket = bound.path().to_path_buf();
    tokio::spawn(ipc::serve(
        bound,
        agent.clone(),
        ipc::ServeOptions::default(),
    ));
    let run = |calls: usize| {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || token_code(&socket, calls))
    };
    // Nobody is signed in, so an allowed `token` answers -32001 and a refused one -32003.
    assert_eq!(
        run(2).await.unwrap(),
        vec![-32001, -32001],
        "allowed once: for this connection"
    );
    assert_eq!(approver.asked.load(Ordering::SeqCst), 1);
    assert_eq!(
        run(1).await.unwrap(),
        vec![-32001],
        "a new connection is asked again: always allow"
    );
    assert_eq!(approver.asked.load(Ordering::SeqCst), 2);
    assert_eq!(run(1).await.unwrap(), vec![-32001], "remembered");
    assert_eq!(approver.asked.load(Ordering::SeqCst), 2, "not asked again");
    let peer = approver.who.lock().unwrap()[0].clone();
    let me = std::env::current_exe().unwrap();
    assert_eq!(
        peer.exe.as_deref(),
        Some(me.as_path()),
        "identified by the OS, not by what it says"
    );
    let hash = peer.sha256.clone().unwrap();
    assert!(policy::revoke(&dir.path().join("data/clients.json"), &hash[..12]).unwrap());
    assert_eq!(
        run(1).await.unwrap(),
        vec![-32003],
        "asked again after revoking: deny"
    );
    assert_eq!(
        run(1).await.unwrap(),
        vec![-32003],
        "the refusal is remembered"
    );
    assert_eq!(approver.asked.load(Ordering::SeqCst), 3);
}
