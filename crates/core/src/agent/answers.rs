//! What the agent answers and announces: the `status`, `token` and `activity` results, the `token`
//! request, and the events every subscriber is sent. Plain data, serialised as the contract says.

use crate::oidc::claims::User;
use crate::store::StoreStatus;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    SignedOut,
    SigningIn,
    SignedIn,
    Locked,
}

/// The `status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub state: SessionState,
    pub environment: String,
    pub user: Option<User>,
    pub expires_at: Option<u64>,
    /// Why the session is locked, while it is.
    pub locked_reason: Option<String>,
    /// Where the session is kept (`keyring` or `memory`) and, when that is not what the config asked
    /// for, why.
    pub store: StoreStatus,
    /// Whether a smartcard is in a reader (`true`), none is (`false`), as far as the PC/SC watcher has
    /// seen; `null` before it has seen any card.
    pub smartcard_present: Option<bool>,
}

/// The `token` result. Its `Debug` does not show the token.
#[derive(Clone, Serialize)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_at: u64,
    /// How long the provider's tokens last, as this one was issued (its expiry less when it arrived);
    /// `None` for a token restored after a restart, whose arrival is not known.
    pub lifetime_secs: Option<u64>,
}

impl std::fmt::Debug for TokenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAnswer")
            .field("access_token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

/// The `activity` result: the inactivity rule, so a client can tell how often to report work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityAnswer {
    pub inactivity_secs: u64,
    /// `"lock"`, `"sign_out"` or `"none"`.
    pub inactivity_action: &'static str,
    /// When the session locks or ends if no program reports activity before then (`None` when the
    /// action is `"none"`).
    pub acts_at: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub min_valid_secs: Option<u64>,
    pub audience: Option<String>,
    pub scope: Option<String>,
}

/// A notification to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SignedIn {
        user: User,
    },
    SignedOut {
        reason: String,
    },
    TokenRefreshed {
        expires_at: u64,
    },
    RoleChanged {
        user: User,
    },
    SessionExpiring {
        expires_at: u64,
    },
    Locked {
        reason: String,
    },
    Unlocked,
    /// The agent is stopping (SIGTERM, Ctrl-C, the app quitting): the last event on every connection
    /// before it closes. `session_survives`: the session was saved where a restarted agent finds it.
    AgentStopping {
        session_survives: bool,
    },
}
