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
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    BadParams(String),
    /// The provider's tokens do not last the `min_valid_secs` asked for: not a malformed request, so a
    /// client can tell it apart (and ask for less) by its code.
    #[error("{0}")]
    TokenTooShort(String),
}

impl AgentError {
    pub fn code(&self) -> i64 {
        match self {
            AgentError::NotSignedIn(_) => -32001,
            AgentError::SignInFailed(_) => -32002,
            AgentError::NotAllowed(_) => -32003,
            AgentError::Locked(_) => -32004,
            AgentError::Unreachable(_) => -32005,
            AgentError::BadParams(_) => -32602,
            AgentError::TokenTooShort(_) => -32006,
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
