//! `cis2-scripted-browser URL`: a stand-in for `$BROWSER` that signs in at the sandbox provider without a
//! person. Who signs in comes from the environment:
//! `CIS2_TEST_USER` (uid, default 555021935107) or `CIS2_TEST_USER_FILE` (a file holding one, read at each
//! run, so a test can pick who signs in next), `CIS2_TEST_AUTHENTICATOR` (default smartcard),
//! `CIS2_TEST_ROLE` (person_roleid; default: the first offered) or `CIS2_TEST_ROLE_FILE` (a file holding
//! one, read at each run, so a test can pick the role of the next sign-in), `CIS2_TEST_CANCEL=1` (press Cancel),
//! `CIS2_TEST_CA` (a PEM file to trust), `CIS2_TEST_BROWSER_LOG` (a file to append each URL opened to).

use cis2_mock_idp::browser::{Script, ScriptedBrowser};
use std::io::Write;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: cis2-scripted-browser URL");
        return ExitCode::from(2);
    };
    if let Ok(log) = std::env::var("CIS2_TEST_BROWSER_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let _ = writeln!(file, "{url}");
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let from_file = |name: &str| {
        env(name)
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty())
    };
    let user = env("CIS2_TEST_USER").or_else(|| from_file("CIS2_TEST_USER_FILE"));
    let mut script = Script::new(
        &user.unwrap_or_else(|| "555021935107".into()),
        &env("CIS2_TEST_AUTHENTICATOR").unwrap_or_else(|| "smartcard".into()),
    );
    script.role = env("CIS2_TEST_ROLE").or_else(|| from_file("CIS2_TEST_ROLE_FILE"));
    script.cancel = env("CIS2_TEST_CANCEL").is_some_and(|v| v == "1");
    let ca = env("CIS2_TEST_CA").and_then(|path| std::fs::read_to_string(path).ok());
    let mut browser = ScriptedBrowser::new(ca.as_deref());
    match browser.sign_in(&url, &script).await {
        Ok(outcome) => {
            match outcome.callback_status {
                Some(status) => eprintln!(
                    "cis2-scripted-browser: redirected; the callback answered HTTP {status}"
                ),
                None => eprintln!("cis2-scripted-browser: redirected to {}", outcome.redirect),
            }
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("cis2-scripted-browser: {why}");
            ExitCode::from(1)
        }
    }
}
