//! What goes wrong, for a caller: [`AgentError`], one variant per JSON-RPC error code of the contract,
//! and [`StartError`], why the agent could not start.

use crate::oidc::rp::SignInError;
use cis2_jose::JoseError;
use cis2_oidc::http::{HttpSetupError, ProviderError};
use std::path::PathBuf;

/// What a client is told went wrong. Each maps to one JSON-RPC error code of the contract; each
/// carries why, typed, so a caller can act on the reason without reading the words, and its `Display`
/// is the sentence the client receives. None holds a token or a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("{0}")]
    NotSignedIn(NotSignedInReason),
    #[error("{0}")]
    SignInFailed(SignInFailedReason),
    /// `program` (as the peer describes itself) may not call `method`, for `reason`.
    #[error("{}", not_allowed_message(.program, .method, .reason))]
    NotAllowed {
        program: String,
        method: String,
        reason: NotAllowedReason,
    },
    /// The session is locked: `reason` as `status.locked_reason` says it, and whether putting the same
    /// smartcard back would unlock it (else only the clinician signing in again does).
    #[error("{}", locked_message(.reason, *.card_unlocks))]
    Locked { reason: String, card_unlocks: bool },
    #[error("{0}")]
    Unreachable(UnreachableReason),
    #[error("{0}")]
    BadParams(BadParamsReason),
    /// `token` asked for an audience the config does not route: a client can pick one of `served`
    /// (empty: this agent serves none). A malformed request as far as the code goes (`-32602`).
    #[error("{}", unknown_audience_message(.asked, .served))]
    UnknownAudience { asked: String, served: Vec<String> },
    /// The provider's tokens do not last the `min_valid_secs` asked for: not a malformed request, so a
    /// client can tell it apart (and ask for less) by its code.
    #[error(
        "min_valid_secs = {asked_secs} is longer than the provider's tokens last ({lifetime_secs} s); ask for less."
    )]
    TokenTooShort { asked_secs: u64, lifetime_secs: u64 },
}

/// Why there is no session to answer from (`-32001`): sign in (again), or, for the races, ask again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotSignedInReason {
    #[error("Nobody is signed in. Sign in first (cis2ctl login, or the agent's window).")]
    Nobody,
    /// The session has no ID token for the relay to exchange.
    #[error("The session holds no ID token to exchange: sign in again (cis2ctl login).")]
    NoIdToken,
    /// A sign-out, lock or role change while an API Platform token was fetched: ask again.
    #[error("The session changed while the API Platform token was being fetched; ask again.")]
    ChangedDuringExchange,
    /// The relay did not accept the session's ID token for `audience` (`invalid_grant`), in the
    /// relay's words (`reason`, which never carries a token).
    #[error(
        "The API Platform token for {audience:?} was refused because the session's ID token was not accepted: {reason}. \
         The session's own token still works. A new sign-in gives a new ID token: sign out and in again \
         (cis2ctl logout, then cis2ctl login); if that is refused too, the relay and this agent are set up \
         for different Care Identity environments: tell the administrator."
    )]
    IdTokenNotAccepted { audience: String, reason: String },
    /// The access token lasts `left_secs` (0: expired), fewer than the `asked_secs`, and there is no
    /// refresh token to renew it.
    #[error("{}", no_refresh_token_message(*.left_secs, *.asked_secs))]
    NoRefreshToken { left_secs: u64, asked_secs: u64 },
    /// The clinician changed while the token was renewed: ask again.
    #[error("The clinician signed in here changed while the token was being renewed; ask again.")]
    ChangedDuringRenewal,
    /// The provider ended the session (it refused the refresh token, or the person changed).
    #[error("The session has ended: {0}. Sign in again.")]
    Ended(SignInError),
    #[error("The session ended while the role was being changed; sign in again.")]
    EndedDuringRoleChange,
}

/// Why a sign-in, role change or renewal did not succeed (`-32002`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignInFailedReason {
    /// The browser flow failed, not for an outage.
    #[error("Sign-in failed: {0}.")]
    Provider(SignInError),
    /// Someone (`uid`, `name`) is signed in and the person at the keyboard asked to sign in without
    /// `[workstation] allow_user_switch`.
    #[error(
        "{} is already signed in here. To sign in as someone else, sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.",
        who(.uid, .name.as_deref())
    )]
    AlreadySignedIn { uid: String, name: Option<String> },
    /// Another clinician (`uid`) is signed in here (the session `locked` or not).
    #[error(
        "{uid} is signed in here{}. They must sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.",
        if *.locked { " (the session is locked)" } else { "" }
    )]
    OtherClinician { uid: String, locked: bool },
    #[error(
        "The role change was completed by another person; the current session is kept. Sign out first to switch clinician."
    )]
    RoleChangeByOther,
    /// Cancelled in the window, or the flow's task ended without answering.
    #[error("The sign-in was cancelled or interrupted; start it again.")]
    Interrupted,
    /// The provider refused to renew the token, not for an outage; the session is kept.
    #[error("The token could not be renewed: {0}. The session is kept.")]
    Renewal(SignInError),
}

/// Why a program may not make its request (`-32003`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotAllowedReason {
    /// The client policy refuses it (not listed under "deny", or refused earlier by the person): the
    /// policy's own words, which name the program and what to do.
    Policy(String),
    /// The policy says ask, and nobody can be asked; `how_to_list` says what to add to the config.
    NoOneToAsk {
        how_to_list: String,
    },
    /// The person signed in answered "Deny".
    RefusedByPerson,
    /// The program's grant (`source`) does not include the method; it allows `allowed`.
    MethodNotGranted {
        source: String,
        allowed: Vec<String>,
    },
    AudienceNotGranted {
        audience: String,
        source: String,
    },
    ScopeNotGranted {
        scope: String,
        source: String,
    },
}

/// Why the Care Identity Service, the relay or the API Platform gave no answer to act on (`-32005`):
/// the session is kept; ask again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnreachableReason {
    /// The browser sign-in or role change met an outage.
    #[error("The Care Identity Service could not be reached: {0}.")]
    SignIn(SignInError),
    /// The renewal met an outage.
    #[error(
        "The token could not be renewed because the Care Identity Service could not be reached ({0}); the session is kept — try again shortly."
    )]
    Renewal(SignInError),
    /// The provider was not asked: the last renewal failed (`last_error`, as the session keeps it)
    /// and the next attempt is due in `due_in_secs`.
    #[error(
        "The token could not be renewed because the Care Identity Service could not be reached ({}; the next attempt is due in {due_in_secs} s); the session is kept — try again shortly.",
        .last_error.as_deref().unwrap_or_default()
    )]
    RenewalBackingOff {
        last_error: Option<String>,
        due_in_secs: u64,
    },
    /// The relay gave no token for `audience` (unreachable, or a server error).
    #[error(
        "The API Platform token for {audience:?} could not be had: {cause}. The session is unaffected; ask again shortly."
    )]
    AudienceToken {
        audience: String,
        cause: ProviderError,
    },
    /// The API Platform refused the relay's own credentials: the relay's administrator must fix it.
    #[error(
        "The API Platform refused the relay's own credentials for {audience:?}: {reason}. Signing in again will \
         not help and the session is unaffected: the relay's administrator must make its [[api_platform]] \
         api_key, key and kid match the application's registration with the API Platform."
    )]
    RelayMisconfigured { audience: String, reason: String },
}

/// What is wrong with a request (`-32602`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadParamsReason {
    /// The params do not parse for the method (`detail`: the parser's words).
    #[error("Bad params: {detail}.")]
    Malformed { detail: String },
    #[error("{param} must be between {min} and {max}.")]
    OutOfRange {
        param: &'static str,
        min: u64,
        max: u64,
    },
    #[error("{param} must be at most {max}.")]
    TooLarge { param: &'static str, max: u64 },
    #[error("{method} params are missing.")]
    Missing { method: &'static str },
    #[error("There is no method {0:?}.")]
    NoSuchMethod(String),
    #[error("Audience tokens need [provider.exchange] method = \"relay\".")]
    AudienceNeedsRelay,
    #[error(
        "This provider does not issue down-scoped tokens: ask without audience and scope for the session's token."
    )]
    NoDownScopedTokens,
    /// The relay refused the exchange for `audience` as a client error: the route is likely wrong.
    #[error(
        "The relay would not exchange for {audience:?} ({cause}); check [[provider.audiences]] route against the relay's [[api_platform]]."
    )]
    RouteRefused {
        audience: String,
        cause: ProviderError,
    },
}

/// Who is signed in, as a refusal names them.
fn who(uid: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{name} ({uid})"),
        None => uid.to_string(),
    }
}

/// What `-32001` says when there is no refresh token to renew a token that does not last.
fn no_refresh_token_message(left_secs: u64, asked_secs: u64) -> String {
    if left_secs > 0 {
        format!(
            "The access token has only {left_secs} s left, fewer than the {asked_secs} s asked, and the provider gave no refresh token to renew it: sign in again (cis2ctl login)."
        )
    } else {
        "The session's access token has expired and the provider gave no refresh token: sign in again (cis2ctl login).".into()
    }
}

/// What `-32003` says: the program, and why it may not.
fn not_allowed_message(program: &str, method: &str, reason: &NotAllowedReason) -> String {
    match reason {
        NotAllowedReason::Policy(words) => words.clone(),
        NotAllowedReason::NoOneToAsk { how_to_list } => format!(
            "{program} is not listed in [[clients]], and cis2-agentd has no one to ask (client_policy = \"ask\").{how_to_list} Or set [agent] client_policy = \"allow\" to let every program of this user in."
        ),
        NotAllowedReason::RefusedByPerson => format!("The person signed in refused {program}."),
        NotAllowedReason::MethodNotGranted { source, allowed } => format!(
            "{program} may not call {method} ({source}: allows {}).",
            allowed.join(", ")
        ),
        NotAllowedReason::AudienceNotGranted { audience, source } => {
            format!("{program} may not ask for tokens for audience {audience:?} ({source}).")
        }
        NotAllowedReason::ScopeNotGranted { scope, source } => {
            format!("{program} may not ask for scope {scope:?} ({source}).")
        }
    }
}

/// What `-32602` says of an audience the agent does not serve.
fn unknown_audience_message(asked: &str, served: &[String]) -> String {
    if served.is_empty() {
        "This agent serves no audiences: ask without audience for the session's token, or have the administrator add [[provider.audiences]] to the agent's config.".into()
    } else {
        format!(
            "No audience {asked:?} is configured; this agent serves {}.",
            served.join(", ")
        )
    }
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
            AgentError::NotAllowed { .. } => -32003,
            AgentError::Locked { .. } => -32004,
            AgentError::Unreachable(_) => -32005,
            AgentError::BadParams(_) | AgentError::UnknownAudience { .. } => -32602,
            AgentError::TokenTooShort { .. } => -32006,
        }
    }

    /// A browser flow's failure: an outage is `-32005` (the session is kept), else `-32002`.
    pub(super) fn from_sign_in(err: SignInError) -> AgentError {
        if err.is_outage() {
            AgentError::Unreachable(UnreachableReason::SignIn(err))
        } else {
            AgentError::SignInFailed(SignInFailedReason::Provider(err))
        }
    }

    pub(super) fn not_signed_in() -> AgentError {
        AgentError::NotSignedIn(NotSignedInReason::Nobody)
    }
}

/// Why the agent could not start: one variant per thing to fix, carrying what names it (the folder, the
/// file, the environment variable), so a front end can act on it; the words are what the person reads.
/// None quotes a secret: a missing client secret is named by its variable, a bad key by its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot use the data folder {}: {source}", path.display())]
    DataFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the audit log in {}: {source}", data_dir.display())]
    AuditLog {
        data_dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the config has no [provider]")]
    NoProvider,
    /// The sandbox was asked for, and this build has none ([`NO_SANDBOX`](super::NO_SANDBOX)).
    #[error("{}", super::NO_SANDBOX)]
    NoSandbox,
    /// The HTTPS client for the provider or relay: usually `[provider] ca_file`.
    #[error(transparent)]
    Https(#[from] HttpSetupError),
    #[error(
        "the client secret is read from the environment variable {variable} ([provider.exchange] secret_env), but it is not set; set it before starting the agent"
    )]
    ClientSecretNotSet { variable: String },
    #[error("cannot read key_file {}: {source}", path.display())]
    KeyFileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key_file {}: {source}", path.display())]
    KeyFileInvalid { path: PathBuf, source: JoseError },
    #[error("[provider.exchange] kid: {0}")]
    BadKid(JoseError),
    #[error("the relay is not a client authentication method")]
    RelayIsNotClientAuth,
    #[cfg(feature = "sandbox")]
    #[error("the sandbox provider could not start: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

impl StartError {
    /// The exit code of a program that could not start the agent: every reason is the configuration's
    /// or the computer's set-up, 2 (interfaces.md).
    pub fn exit_code(&self) -> u8 {
        2
    }
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
        let unknown = AgentError::UnknownAudience {
            asked: "pds".into(),
            served: vec!["ers".into(), "gp-connect".into()],
        };
        assert_eq!(unknown.code(), -32602);
        assert_eq!(
            unknown.to_string(),
            "No audience \"pds\" is configured; this agent serves ers, gp-connect."
        );
        let none_served = AgentError::UnknownAudience {
            asked: "pds".into(),
            served: Vec::new(),
        };
        assert_eq!(none_served.code(), -32602);
        assert_eq!(
            none_served.to_string(),
            "This agent serves no audiences: ask without audience for the session's token, or have the administrator add [[provider.audiences]] to the agent's config."
        );
    }

    /// Each typed reason answers with its contract code and the sentence it was when it was a string
    /// (docs/ipc.md, and what clients and their tests match).
    #[test]
    fn typed_reasons_keep_their_codes_and_words() {
        let outage = || {
            SignInError::Exchange(ProviderError::Unreachable {
                what: "the token endpoint".into(),
                cause: cis2_oidc::http::Unreached::Refused,
                detail: "connection refused".into(),
            })
        };
        let relay_said = |status| ProviderError::Status {
            what: "the relay".into(),
            status,
            description: Some("no such route".into()),
            oauth_error: None,
        };
        let ehr = "/usr/bin/ward-ehr (pid 7)";
        let not_allowed = |reason| AgentError::NotAllowed {
            program: ehr.into(),
            method: "token".into(),
            reason,
        };
        let cases: Vec<(AgentError, i64, String)> = vec![
            (
                AgentError::not_signed_in(),
                -32001,
                "Nobody is signed in. Sign in first (cis2ctl login, or the agent's window).".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::NoIdToken),
                -32001,
                "The session holds no ID token to exchange: sign in again (cis2ctl login).".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::ChangedDuringExchange),
                -32001,
                "The session changed while the API Platform token was being fetched; ask again.".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::IdTokenNotAccepted {
                    audience: "pds".into(),
                    reason: "the ID token has expired".into(),
                }),
                -32001,
                "The API Platform token for \"pds\" was refused because the session's ID token was not accepted: the ID token has expired. \
                 The session's own token still works. A new sign-in gives a new ID token: sign out and in again \
                 (cis2ctl logout, then cis2ctl login); if that is refused too, the relay and this agent are set up \
                 for different Care Identity environments: tell the administrator.".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::NoRefreshToken {
                    left_secs: 30,
                    asked_secs: 60,
                }),
                -32001,
                "The access token has only 30 s left, fewer than the 60 s asked, and the provider gave no refresh token to renew it: sign in again (cis2ctl login).".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::NoRefreshToken {
                    left_secs: 0,
                    asked_secs: 60,
                }),
                -32001,
                "The session's access token has expired and the provider gave no refresh token: sign in again (cis2ctl login).".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::ChangedDuringRenewal),
                -32001,
                "The clinician signed in here changed while the token was being renewed; ask again.".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::Ended(SignInError::SubjectChanged)),
                -32001,
                "The session has ended: the refreshed tokens are for another person (sub changed). Sign in again.".into(),
            ),
            (
                AgentError::NotSignedIn(NotSignedInReason::EndedDuringRoleChange),
                -32001,
                "The session ended while the role was being changed; sign in again.".into(),
            ),
            (
                AgentError::from_sign_in(SignInError::NoIdToken),
                -32002,
                "Sign-in failed: the provider gave no ID token (is `openid` in the scopes?).".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::AlreadySignedIn {
                    uid: "555000000001".into(),
                    name: Some("Dr A".into()),
                }),
                -32002,
                "Dr A (555000000001) is already signed in here. To sign in as someone else, sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::AlreadySignedIn {
                    uid: "555000000001".into(),
                    name: None,
                }),
                -32002,
                "555000000001 is already signed in here. To sign in as someone else, sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::OtherClinician {
                    uid: "555000000001".into(),
                    locked: true,
                }),
                -32002,
                "555000000001 is signed in here (the session is locked). They must sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::OtherClinician {
                    uid: "555000000001".into(),
                    locked: false,
                }),
                -32002,
                "555000000001 is signed in here. They must sign out first (cis2ctl logout), or set [workstation] allow_user_switch = true.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::RoleChangeByOther),
                -32002,
                "The role change was completed by another person; the current session is kept. Sign out first to switch clinician.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::Interrupted),
                -32002,
                "The sign-in was cancelled or interrupted; start it again.".into(),
            ),
            (
                AgentError::SignInFailed(SignInFailedReason::Renewal(SignInError::NoIdToken)),
                -32002,
                "The token could not be renewed: the provider gave no ID token (is `openid` in the scopes?). The session is kept.".into(),
            ),
            (
                not_allowed(NotAllowedReason::Policy(
                    "/usr/bin/ward-ehr (pid 7) is not listed in [[clients]] and client_policy is \"deny\".".into(),
                )),
                -32003,
                "/usr/bin/ward-ehr (pid 7) is not listed in [[clients]] and client_policy is \"deny\".".into(),
            ),
            (
                not_allowed(NotAllowedReason::NoOneToAsk {
                    how_to_list: " Add it to [[clients]].".into(),
                }),
                -32003,
                format!("{ehr} is not listed in [[clients]], and cis2-agentd has no one to ask (client_policy = \"ask\"). Add it to [[clients]]. Or set [agent] client_policy = \"allow\" to let every program of this user in."),
            ),
            (
                not_allowed(NotAllowedReason::RefusedByPerson),
                -32003,
                format!("The person signed in refused {ehr}."),
            ),
            (
                not_allowed(NotAllowedReason::MethodNotGranted {
                    source: "[[clients]] ehr".into(),
                    allowed: vec!["status".into(), "whoami".into()],
                }),
                -32003,
                format!("{ehr} may not call token ([[clients]] ehr: allows status, whoami)."),
            ),
            (
                not_allowed(NotAllowedReason::AudienceNotGranted {
                    audience: "pds".into(),
                    source: "[[clients]] ehr".into(),
                }),
                -32003,
                format!("{ehr} may not ask for tokens for audience \"pds\" ([[clients]] ehr)."),
            ),
            (
                not_allowed(NotAllowedReason::ScopeNotGranted {
                    scope: "nhsperson".into(),
                    source: "[[clients]] ehr".into(),
                }),
                -32003,
                format!("{ehr} may not ask for scope \"nhsperson\" ([[clients]] ehr)."),
            ),
            (
                AgentError::from_sign_in(outage()),
                -32005,
                format!("The Care Identity Service could not be reached: {}.", outage()),
            ),
            (
                AgentError::Unreachable(UnreachableReason::Renewal(outage())),
                -32005,
                format!("The token could not be renewed because the Care Identity Service could not be reached ({}); the session is kept — try again shortly.", outage()),
            ),
            (
                AgentError::Unreachable(UnreachableReason::RenewalBackingOff {
                    last_error: Some("the token endpoint could not be reached".into()),
                    due_in_secs: 4,
                }),
                -32005,
                "The token could not be renewed because the Care Identity Service could not be reached (the token endpoint could not be reached; the next attempt is due in 4 s); the session is kept — try again shortly.".into(),
            ),
            (
                AgentError::Unreachable(UnreachableReason::AudienceToken {
                    audience: "pds".into(),
                    cause: relay_said(503),
                }),
                -32005,
                "The API Platform token for \"pds\" could not be had: the relay answered HTTP 503: no such route. The session is unaffected; ask again shortly.".into(),
            ),
            (
                AgentError::Unreachable(UnreachableReason::RelayMisconfigured {
                    audience: "pds".into(),
                    reason: "invalid api key".into(),
                }),
                -32005,
                "The API Platform refused the relay's own credentials for \"pds\": invalid api key. Signing in again will \
                 not help and the session is unaffected: the relay's administrator must make its [[api_platform]] \
                 api_key, key and kid match the application's registration with the API Platform.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::Malformed {
                    detail: "unknown field `x`".into(),
                }),
                -32602,
                "Bad params: unknown field `x`.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::OutOfRange {
                    param: "timeout_secs",
                    min: 1,
                    max: 3600,
                }),
                -32602,
                "timeout_secs must be between 1 and 3600.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::TooLarge {
                    param: "min_valid_secs",
                    max: 86_400,
                }),
                -32602,
                "min_valid_secs must be at most 86400.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::Missing { method: "token" }),
                -32602,
                "token params are missing.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::NoSuchMethod("nope".into())),
                -32602,
                "There is no method \"nope\".".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::AudienceNeedsRelay),
                -32602,
                "Audience tokens need [provider.exchange] method = \"relay\".".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::NoDownScopedTokens),
                -32602,
                "This provider does not issue down-scoped tokens: ask without audience and scope for the session's token.".into(),
            ),
            (
                AgentError::BadParams(BadParamsReason::RouteRefused {
                    audience: "pds".into(),
                    cause: relay_said(404),
                }),
                -32602,
                "The relay would not exchange for \"pds\" (the relay answered HTTP 404: no such route); check [[provider.audiences]] route against the relay's [[api_platform]].".into(),
            ),
        ];
        for (error, code, words) in cases {
            assert_eq!(error.code(), code, "{error:?}");
            assert_eq!(error.to_string(), words, "{error:?}");
        }
    }

    /// A browser flow's failure keeps the provider's typed error: an outage is told apart from a
    /// refusal by its variant, with the unreached cause a caller can act on.
    #[test]
    fn a_sign_in_failure_keeps_the_providers_error() {
        let refused = SignInError::Exchange(ProviderError::Unreachable {
            what: "the token endpoint".into(),
            cause: cis2_oidc::http::Unreached::Certificate,
            detail: "invalid peer certificate".into(),
        });
        match AgentError::from_sign_in(refused.clone()) {
            AgentError::Unreachable(UnreachableReason::SignIn(SignInError::Exchange(
                ProviderError::Unreachable { cause, .. },
            ))) => assert_eq!(cause, cis2_oidc::http::Unreached::Certificate),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            AgentError::from_sign_in(SignInError::SubjectChanged),
            AgentError::SignInFailed(SignInFailedReason::Provider(SignInError::SubjectChanged))
        );
    }

    /// Why the agent did not start: a front end can match the variant (and read the file, folder or
    /// variable it names), the words are those it printed as strings, and every reason exits with 2.
    #[test]
    fn start_errors_name_what_to_fix_in_the_same_words() {
        let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let cases: Vec<(StartError, String)> = vec![
            (
                StartError::DataFolder {
                    path: "/nowhere/cis2".into(),
                    source: not_found(),
                },
                format!("cannot use the data folder /nowhere/cis2: {}", not_found()),
            ),
            (
                StartError::AuditLog {
                    data_dir: "/data".into(),
                    source: not_found(),
                },
                format!("cannot open the audit log in /data: {}", not_found()),
            ),
            (
                StartError::NoProvider,
                "the config has no [provider]".into(),
            ),
            (StartError::NoSandbox, super::super::NO_SANDBOX.into()),
            (
                StartError::ClientSecretNotSet {
                    variable: "CIS2_SECRET".into(),
                },
                "the client secret is read from the environment variable CIS2_SECRET ([provider.exchange] secret_env), but it is not set; set it before starting the agent".into(),
            ),
            (
                StartError::KeyFileUnreadable {
                    path: "/keys/rp.pem".into(),
                    source: not_found(),
                },
                format!("cannot read key_file /keys/rp.pem: {}", not_found()),
            ),
            (
                StartError::RelayIsNotClientAuth,
                "the relay is not a client authentication method".into(),
            ),
            (
                StartError::Https(HttpSetupError::CaEmpty),
                "the extra CA file holds no certificate".into(),
            ),
            (
                StartError::Https(HttpSetupError::CaFileUnreadable {
                    path: "/etc/ca.pem".into(),
                    source: not_found(),
                }),
                format!("cannot read ca_file /etc/ca.pem: {}", not_found()),
            ),
        ];
        for (error, words) in cases {
            assert_eq!(error.to_string(), words);
            assert_eq!(error.exit_code(), 2, "{error:?}");
        }
    }

    /// A bad key file is named by its path; its contents, which may be a private key, are not quoted.
    #[test]
    fn a_key_file_that_is_not_a_key_is_named_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rp.pem");
        let contents = "-----BEGIN PRIVATE KEY-----\nTm90QUtleVNlY3JldFNlY3JldA==\n-----END PRIVATE KEY-----\n";
        std::fs::write(&path, contents).unwrap();
        let provider: crate::config::ProviderConfig = toml::from_str(&format!(
            "issuer = \"https://cis2.example/realm\"\nclient_id = \"rp\"\n[exchange]\nmethod = \"private_key_jwt\"\nkey_file = {:?}\n",
            path.display().to_string()
        ))
        .unwrap();
        let error = super::super::startup::client_auth(&provider).unwrap_err();
        let StartError::KeyFileInvalid { path: named, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(named, &path);
        let (shown, debugged) = (error.to_string(), format!("{error:?}"));
        assert!(
            shown.starts_with(&format!("key_file {}: ", path.display())),
            "{shown}"
        );
        assert!(
            !shown.contains("Tm90QUtleVNlY3JldFNlY3JldA")
                && !debugged.contains("Tm90QUtleVNlY3JldFNlY3JldA")
        );
    }

    /// A client secret that is missing is named by its variable, which a front end can show or set.
    #[test]
    fn a_client_secret_not_set_names_its_variable() {
        let provider: crate::config::ProviderConfig = toml::from_str(
            "issuer = \"https://cis2.example/realm\"\nclient_id = \"rp\"\n[exchange]\nmethod = \"client_secret_post\"\nsecret_env = \"CIS2_UNSET_SECRET_OF_A_TEST\"\n",
        )
        .unwrap();
        match super::super::startup::client_auth(&provider) {
            Err(StartError::ClientSecretNotSet { variable }) => {
                assert_eq!(variable, "CIS2_UNSET_SECRET_OF_A_TEST")
            }
            other => panic!("{:?}", other.err()),
        }
    }
}
