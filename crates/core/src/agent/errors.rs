//! What goes wrong, for a caller: [`AgentError`], one variant per JSON-RPC error code of the contract,
//! and [`StartError`], why the agent could not start.

use crate::oidc::rp::SignInError;

/// What a client is told went wrong. Each maps to one JSON-RPC error code of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotSignedIn(String),
    #[error("{0}")]
    SignInFailed(String),
    #[error("{0}")]
    NotAllowed(String),
    /// The session is locked: `reason` as `status.locked_reason` says it, and whether putting the same
    /// smartcard back would unlock it (else only the clinician signing in again does).
    #[error("{}", locked_message(.reason, *.card_unlocks))]
    Locked { reason: String, card_unlocks: bool },
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    BadParams(String),
    /// The provider's tokens do not last the `min_valid_secs` asked for: not a malformed request, so a
    /// client can tell it apart (and ask for less) by its code.
    #[error(
        "min_valid_secs = {asked_secs} is longer than the provider's tokens last ({lifetime_secs} s); ask for less."
    )]
    TokenTooShort { asked_secs: u64, lifetime_secs: u64 },
}

/// What `-32004` says: why, and how to unlock.
fn locked_message(reason: &str, card_unlocks: bool) -> String {
    let card_back = if card_unlocks {
        "put the same smartcard back, or "
    } else {
        ""
    };
    format!(
        "The session is locked ({reason}). To unlock it the clinician must {card_back}sign in again (cis2ctl login, or the agent's window)."
    )
}

impl AgentError {
    pub fn code(&self) -> i64 {
        match self {
            AgentError::NotSignedIn(_) => -32001,
            AgentError::SignInFailed(_) => -32002,
            AgentError::NotAllowed(_) => -32003,
            AgentError::Locked { .. } => -32004,
            AgentError::Unreachable(_) => -32005,
            AgentError::BadParams(_) => -32602,
            AgentError::TokenTooShort { .. } => -32006,
        }
    }

    pub(super) fn from_sign_in(err: SignInError) -> AgentError {
        if err.is_outage() {
            AgentError::Unreachable(format!(
                "The Care Identity Service could not be reached: {err}."
            ))
        } else {
            AgentError::SignInFailed(format!("Sign-in failed: {err}."))
        }
    }

    pub(super) fn not_signed_in() -> AgentError {
        AgentError::NotSignedIn(
            "Nobody is signed in. Sign in first (cis2ctl login, or the agent's window).".into(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("the sandbox provider could not start: {0}")]
    Sandbox(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed variants say exactly what the contract's messages said when they were strings.
    #[test]
    fn typed_variants_keep_their_codes_and_words() {
        let by_card = AgentError::Locked {
            reason: "the smartcard was removed".into(),
            card_unlocks: true,
        };
        assert_eq!(by_card.code(), -32004);
        assert_eq!(
            by_card.to_string(),
            "The session is locked (the smartcard was removed). To unlock it the clinician must put the same smartcard back, or sign in again (cis2ctl login, or the agent's window)."
        );
        let by_signal = AgentError::Locked {
            reason: "the screen was locked".into(),
            card_unlocks: false,
        };
        assert_eq!(
            by_signal.to_string(),
            "The session is locked (the screen was locked). To unlock it the clinician must sign in again (cis2ctl login, or the agent's window)."
        );
        let too_short = AgentError::TokenTooShort {
            asked_secs: 600,
            lifetime_secs: 299,
        };
        assert_eq!(too_short.code(), -32006);
        assert_eq!(
            too_short.to_string(),
            "min_valid_secs = 600 is longer than the provider's tokens last (299 s); ask for less."
        );
    }
}
