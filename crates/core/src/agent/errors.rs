//! What goes wrong, for a caller: [`AgentError`], one variant per JSON-RPC error code of the contract,
//! and [`StartError`], why the agent could not start.

use crate::oidc::rp::SignInError;
use cis2_jose::JoseError;
use cis2_oidc::http::HttpSetupError;
use std::path::PathBuf;

/// What a client is told went wrong. Each maps to one JSON-RPC error code of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
            AgentError::NotAllowed(_) => -32003,
            AgentError::Locked { .. } => -32004,
            AgentError::Unreachable(_) => -32005,
            AgentError::BadParams(_) | AgentError::UnknownAudience { .. } => -32602,
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
