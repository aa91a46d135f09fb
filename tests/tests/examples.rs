//! The integration examples in docs/ run against a real agent, so they cannot rot.

use cis2_system_tests::{Agent, stderr, stdout};
use std::path::Path;
use std::process::Command;

#[test]
fn the_python_example_signs_in_and_gets_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &["--sandbox"], &[]);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/cis2_client.py");
    let output = Command::new("/usr/bin/python3")
        .arg(&example)
        .arg(&agent.socket)
        .output()
        .expect("python3 runs");
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(&output));
    assert!(text.contains("SANDBOX"), "{text}");
    assert!(text.contains("user: Amelia Hart (555021935107)"), "{text}");
    assert!(text.contains("access token:"), "{text}");
    assert!(text.contains("event: signed_in"), "{text}");
    let token = stdout(&agent.ctl(&["token"])).trim().to_string();
    assert!(
        token.len() > 20 && !text.contains(&token),
        "the example never prints the token"
    );
}
