//! Hooks the system tests use to crash or slow the agent at a chosen step, compiled in only with the
//! `test-hooks` feature (never in release builds or packages; `scripts/check-test-hooks` checks).

#[cfg(feature = "test-hooks")]
use std::time::Duration;

/// Tests of crash safety set `CIS2_TEST_CRASH_AT` to a step name; the process then dies there, as a
/// power cut or `kill -9` would. Compiled in only with the `test-hooks` feature, which the system tests
/// turn on and release builds and packages do not: a shipped agent cannot be crashed this way.
#[cfg(feature = "test-hooks")]
pub(super) fn crash_point(step: &str) {
    if std::env::var("CIS2_TEST_CRASH_AT").is_ok_and(|v| v == step) {
        eprintln!("CIS2_TEST_CRASH_AT={step}: aborting here for a crash-safety test");
        std::process::abort();
    }
}

#[cfg(not(feature = "test-hooks"))]
pub(super) fn crash_point(_step: &str) {}

/// Tests of hand-over races set `CIS2_TEST_PAUSE_TOKEN_MS` to hold each `token` answer that long
/// after it was read, widening the window in which a sign-out can overtake it. Only with the
/// `test-hooks` feature, like [`crash_point`].
#[cfg(feature = "test-hooks")]
pub async fn test_pause_token() {
    if let Some(ms) = std::env::var("CIS2_TEST_PAUSE_TOKEN_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "test-hooks"))]
pub async fn test_pause_token() {}
