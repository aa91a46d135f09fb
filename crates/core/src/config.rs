//! Loading and validating the agent config file: the format is interfaces.md's "Config file (TOML)",
//! every key is described in docs/configuration.md. This module holds the public types and
//! [`load`]/[`parse`]; `read` fills them with serde and adds what is ours (presets, the issuer kept
//! as written, secrets refused, cross-field rules); `paths` finds the file. Every mistake is a
//! [`ConfigError`] (shared with the relay) naming the file, the line and what to write instead.

mod paths;
mod read;

use std::fmt;
use std::path::{Path, PathBuf};

pub use cis2_config_error::ConfigError;
pub use paths::{default_data_dir, default_path, resolve_path};
use serde::{Deserialize, Serialize};
#[cfg(test)]
use {
    paths::{Os, default_data_dir_with, default_path_with},
    std::ffi::OsString,
};

/// Issuer of NHS CIS2 INT (path to live), exactly as tokens carry it (cis2-reference.md §1).
pub const INT_ISSUER: &str = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
/// Issuer of NHS CIS2 Live, exactly as tokens carry it (cis2-reference.md §1).
pub const LIVE_ISSUER: &str = "https://am.nhsidentity.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
/// `[provider] scopes` when the file gives none.
pub const DEFAULT_SCOPES: [&str; 7] = [
    "openid",
    "profile",
    "email",
    "nhsperson",
    "nationalrbacaccess",
    "associatedorgs",
    "selectedrole",
];
/// `[provider] acr_values` when the file gives none.
pub const DEFAULT_ACR_VALUES: &str = "AAL2_OR_AAL3_ANY";
/// `[provider] max_age` when the file gives none (seconds).
pub const DEFAULT_MAX_AGE: u64 = 300;
/// `[provider] prompt` when the file gives none (CIS2 role selection needs `login`).
pub const DEFAULT_PROMPT: &str = "login";
/// `[provider] login_timeout_secs` when the file gives none.
pub const DEFAULT_LOGIN_TIMEOUT_SECS: u64 = 300;
/// The IPC methods a `[[clients]]` rule may list in `methods`.
pub const CLIENT_METHODS: [&str; 9] = [
    "status",
    "version",
    "login",
    "whoami",
    "token",
    "change_role",
    "logout",
    "subscribe",
    "activity",
];
/// The largest duration in the file, in seconds (366 days): adding it to a clock cannot overflow.
pub const MAX_SECS: u64 = 366 * 24 * 60 * 60;

/// An enum whose values have one name in the file and on the wire, and know their names.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant ),+
        }

        impl $name {
            /// Every value's name in the config file (and on the wire).
            pub const NAMES: &'static [&'static str] = &[ $( $text ),+ ];

            /// The name of this value in the config file (and on the wire).
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// `environment`: the embedded mock provider (`sandbox`, not NHS CIS2), NHS CIS2 INT or Live,
    /// or any other OpenID Connect provider (`custom`, which must give `issuer`).
    Environment { Sandbox => "sandbox", Int => "int", Live => "live", Custom => "custom" }
}

impl Environment {
    /// The issuer this preset fills in when the file gives none.
    pub fn preset_issuer(self) -> Option<&'static str> {
        match self {
            Environment::Int => Some(INT_ISSUER),
            Environment::Live => Some(LIVE_ISSUER),
            Environment::Sandbox | Environment::Custom => None,
        }
    }
}

named_enum! {
    /// `[provider.exchange] method`: who swaps the code for tokens: the vendor's `cis2-relay` (the
    /// confidential client CIS2 requires), or the agent itself with a signed JWT, with a client
    /// secret from the environment, or as a public client (PKCE only, the default).
    #[derive(Default)]
    ExchangeMethod {
        Relay => "relay",
        PrivateKeyJwt => "private_key_jwt",
        ClientSecretPost => "client_secret_post",
        #[default] None => "none",
    }
}

named_enum! {
    /// `[provider.exchange] alg`: how a `private_key_jwt` assertion is signed (RSASSA-PKCS1-v1_5).
    #[allow(clippy::upper_case_acronyms)]
    #[derive(Default)]
    SigningAlg { RS256 => "RS256", #[default] RS512 => "RS512" }
}

named_enum! {
    /// `[agent] store`: the OS keychain (the default), or memory only (shared PCs).
    #[derive(Default)]
    StoreKind { #[default] Keyring => "keyring", Memory => "memory" }
}

named_enum! {
    /// `[agent] client_policy`: what happens when a program not in `[[clients]]` connects (`ask`
    /// the person at the desk; `cis2-agentd` has no one to ask, so there it refuses).
    ClientPolicy { Ask => "ask", Allow => "allow", Deny => "deny" }
}

named_enum! {
    /// `[workstation] on_os_lock`, `on_card_removal`: what the event does to the session.
    SignalAction { Ignore => "ignore", Lock => "lock", SignOut => "sign_out" }
}

named_enum! {
    /// `[session] inactivity_action`: what `inactivity_secs` without a request does (`none`: off).
    InactivityAction { Lock => "lock", SignOut => "sign_out", None => "none" }
}

/// `[provider.exchange]`. Absent, the method is `relay` for `int` and `live` (CIS2 wants a
/// confidential client, which the desktop is not) and `none` for `custom`. Keys the method does not
/// use may be present and are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exchange {
    pub method: ExchangeMethod,
    /// The `cis2-relay` base URL, as written (`relay`): `https://`, or `http://` to loopback.
    pub relay_url: Option<String>,
    /// PEM RSA private key (`private_key_jwt`).
    pub key_file: Option<PathBuf>,
    pub alg: SigningAlg,
    /// The key id registered with CIS2 for `key_file`; absent, its RFC 7638 thumbprint.
    pub kid: Option<String>,
    /// The NAME of the environment variable holding the client secret (`client_secret_post`).
    pub secret_env: Option<String>,
}

/// `[provider]`: the OpenID Connect provider and this agent's client registration with it.
/// Beyond `interfaces.md`: `prompt`, `redirect_ports`, `login_timeout_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Kept exactly as written (or as the preset gives it): never round-tripped through a URL type,
    /// which would drop CIS2's `:443`.
    pub issuer: String,
    pub client_id: String,
    /// Contains `openid`; duplicates dropped.
    pub scopes: Vec<String>,
    /// `None`: not sent (`acr_values = ""`).
    pub acr_values: Option<String>,
    /// Seconds; 0 asks for a fresh sign-in every time.
    pub max_age: Option<u64>,
    /// `None`: not sent (`prompt = ""`).
    pub prompt: Option<String>,
    /// Extra trust anchor (PEM); system roots stay trusted.
    pub ca_file: Option<PathBuf>,
    /// Fixed loopback ports for the redirect, tried in order; empty: a free port at each sign-in.
    pub redirect_ports: Vec<u16>,
    /// How long a sign-in may take in the browser, in seconds.
    pub login_timeout_secs: u64,
    pub exchange: Exchange,
    /// `[[provider.audiences]]`: API Platform tokens served for `token` with `audience`, exchanged
    /// through the relay (so only with `method = "relay"`).
    pub audiences: Vec<AudienceRoute>,
}

/// The defaults of every key; `issuer` and `client_id` empty (the file or a preset gives them).
impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            issuer: String::new(),
            client_id: String::new(),
            scopes: DEFAULT_SCOPES.map(String::from).to_vec(),
            acr_values: Some(DEFAULT_ACR_VALUES.to_owned()),
            max_age: Some(DEFAULT_MAX_AGE),
            prompt: Some(DEFAULT_PROMPT.to_owned()),
            ca_file: None,
            redirect_ports: Vec::new(),
            login_timeout_secs: DEFAULT_LOGIN_TIMEOUT_SECS,
            exchange: Exchange::default(),
            audiences: Vec::new(),
        }
    }
}

/// One `[[provider.audiences]]` entry: what programs ask for (`name`) and the relay's
/// `[[api_platform]] audience` it is exchanged at (`route`, default `name`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudienceRoute {
    pub name: String,
    pub route: String,
}

/// `[agent]`. `None` paths are the defaults (interfaces.md "The local socket", [`default_data_dir`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub socket: Option<PathBuf>,
    pub store: StoreKind,
    pub data_dir: Option<PathBuf>,
    /// `None`: not set; see [`Config::effective_client_policy`].
    pub client_policy: Option<ClientPolicy>,
    /// `fdatasync` the audit log before answering the requests it records. Off by default: a flush
    /// costs about a millisecond, more than the IPC latency target allows.
    pub audit_sync: bool,
}

/// One `[[clients]]` entry: a program allowed to use the agent, identified by the OS. Has `name`
/// and `path` (absolute) or `sha256` (stored lower case); `script`, `script_sha256` and `scopes`
/// are beyond `interfaces.md`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientRule {
    pub name: String,
    pub path: Option<PathBuf>,
    pub sha256: Option<String>,
    /// An interpreter's script, as its command line names it (absolute).
    pub script: Option<PathBuf>,
    pub script_sha256: Option<String>,
    /// `None`: every method but `logout`. Entries are among [`CLIENT_METHODS`].
    pub methods: Option<Vec<String>>,
    /// Token audiences it may ask for (empty: the default token only).
    pub audiences: Vec<String>,
    /// Scopes it may ask for beyond the session's.
    pub scopes: Vec<String>,
}

/// `[session]`: durations in seconds, at most [`MAX_SECS`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Renew this long before the access token expires.
    pub refresh_margin_secs: u64,
    /// Announce `session_expiring` this long before a session that cannot be renewed ends.
    pub expiring_notice_secs: u64,
    /// At least 1: `inactivity_action = "none"` is the one way to switch it off.
    pub inactivity_secs: u64,
    pub inactivity_action: InactivityAction,
    /// A session never lasts longer than this.
    pub absolute_secs: u64,
    /// RP-initiated logout at the provider on logout.
    pub end_session_at_provider: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            refresh_margin_secs: 60,
            expiring_notice_secs: 120,
            inactivity_secs: 900,
            inactivity_action: InactivityAction::Lock,
            absolute_secs: 43200,
            end_session_at_provider: true,
        }
    }
}

/// `[workstation]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkstationConfig {
    pub on_os_lock: SignalAction,
    pub on_card_removal: SignalAction,
    pub same_card_unlocks: bool,
    pub allow_user_switch: bool,
}

impl Default for WorkstationConfig {
    fn default() -> Self {
        WorkstationConfig {
            on_os_lock: SignalAction::Lock,
            on_card_removal: SignalAction::Lock,
            same_card_unlocks: true,
            allow_user_switch: false,
        }
    }
}

/// The whole config file, validated, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub environment: Environment,
    /// `None` only in the sandbox (which uses its embedded provider).
    pub provider: Option<ProviderConfig>,
    pub agent: AgentConfig,
    /// `[[clients]]`, in file order.
    pub clients: Vec<ClientRule>,
    pub session: SessionConfig,
    pub workstation: WorkstationConfig,
    /// The file this came from; `None` for [`Config::sandbox`].
    pub source: Option<PathBuf>,
}

impl Config {
    /// The config used when there is no file, or with `--sandbox`: the embedded provider and
    /// defaults everywhere.
    pub fn sandbox() -> Config {
        Config {
            environment: Environment::Sandbox,
            provider: None,
            agent: AgentConfig::default(),
            clients: Vec::new(),
            session: SessionConfig::default(),
            workstation: WorkstationConfig::default(),
            source: None,
        }
    }

    /// Whether this is the sandbox (not NHS CIS2).
    pub fn is_sandbox(&self) -> bool {
        self.environment == Environment::Sandbox
    }

    /// `[agent] client_policy` if set, else `allow` in the sandbox, else `ask`.
    pub fn effective_client_policy(&self) -> ClientPolicy {
        match self.agent.client_policy {
            Some(policy) => policy,
            None if self.is_sandbox() => ClientPolicy::Allow,
            None => ClientPolicy::Ask,
        }
    }
}

/// Reads and validates the config file at `path`; unlike [`parse`], also checks that `ca_file` and
/// `key_file` exist. A missing or unreadable file is an error naming it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let (message, fix) = match e.kind() {
            std::io::ErrorKind::NotFound => (
                "the config file does not exist.".to_owned(),
                "Check the path given with --config or in $CIS2_AGENT_CONFIG \
                 (with no config file at all the agent starts in sandbox mode).",
            ),
            std::io::ErrorKind::InvalidData => (
                "the config file is not UTF-8 text.".to_owned(),
                "Save it as UTF-8.",
            ),
            _ => (
                format!("cannot read the config file ({e})."),
                "Check that it is a file and that this user may read it.",
            ),
        };
        ConfigError::new(path, None, message, fix)
    })?;
    read::parse_inner(&text, path, true)
}

/// Validates config text without touching the disk. `origin` names the file in errors, becomes
/// [`Config::source`], and relative paths are read from its folder.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    read::parse_inner(text, origin, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: &str = "https://relay.example.nhs.uk/";
    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(text: &str) -> Config {
        parse(text, Path::new("config.toml")).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn bad(text: &str) -> ConfigError {
        match parse(text, Path::new("config.toml")) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's line and that its text contains every fragment.
    fn check(e: &ConfigError, line: usize, fragments: &[&str]) {
        assert_eq!(e.line, Some(line), "wrong line in: {e}");
        let text = e.to_string();
        for fragment in fragments {
            assert!(text.contains(fragment), "{fragment:?} missing from: {text}");
        }
    }

    /// A minimal valid INT file, then `extra` (which starts on line 6).
    fn int_with(extra: &str) -> String {
        format!(
            "environment = \"int\"\n[provider]\nclient_id = \"123456789012.apps.national\"\n\
             [provider.exchange]\nrelay_url = \"{RELAY}\"\n{extra}"
        )
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cis2-config-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    const FULL: &str = r#"environment = "int"            # "sandbox" | "int" | "live" | "custom"

[provider]
issuer = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare"
client_id = "123456789012.apps.national"
scopes = ["openid", "profile", "email", "nationalrbacaccess", "associatedorgs", "selectedrole"]
acr_values = "AAL2_OR_AAL3_ANY"
max_age = 300                  # seconds
ca_file = "/path/extra-ca.pem" # optional extra trust anchor

[provider.exchange]             # who swaps the code for tokens
method = "relay"
relay_url = "https://relay.example.nhs.uk/"
key_file = "client-key.pem"    # private_key_jwt: PEM RSA key
alg = "RS512"
kid = "eps-cpt-ui-int"
secret_env = "CIS2_CLIENT_SECRET"

[agent]
socket = "/run/user/1000/cis2-agent/agent.sock"
store = "keyring"
data_dir = "/var/lib/cis2-agent"
client_policy = "ask"

[[clients]]
name = "Ward EHR"
path = "/opt/ehr/bin/ehr"
sha256 = "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef"
methods = ["status", "whoami", "token", "subscribe"]
audiences = []

[session]
refresh_margin_secs = 60
expiring_notice_secs = 120
inactivity_secs = 900
inactivity_action = "lock"
absolute_secs = 43200
end_session_at_provider = true

[workstation]
on_os_lock = "lock"
on_card_removal = "lock"
same_card_unlocks = true
allow_user_switch = false
"#;

    #[test]
    fn full_example_from_the_contract_parses() {
        let config = parse(FULL, Path::new("/etc/cis2-agent/config.toml")).expect("valid");
        assert_eq!(config.environment, Environment::Int);
        assert!(!config.is_sandbox());
        assert_eq!(
            config.source.as_deref(),
            Some(Path::new("/etc/cis2-agent/config.toml"))
        );
        let p = config.provider.as_ref().expect("provider");
        assert_eq!(p.issuer, INT_ISSUER);
        assert_eq!(p.client_id, "123456789012.apps.national");
        assert_eq!(
            p.scopes,
            [
                "openid",
                "profile",
                "email",
                "nationalrbacaccess",
                "associatedorgs",
                "selectedrole"
            ]
        );
        assert_eq!(p.acr_values.as_deref(), Some("AAL2_OR_AAL3_ANY"));
        assert_eq!(p.max_age, Some(300));
        assert_eq!(p.prompt.as_deref(), Some("login"));
        assert_eq!(p.ca_file.as_deref(), Some(Path::new("/path/extra-ca.pem")));
        assert!(p.redirect_ports.is_empty());
        assert_eq!(p.login_timeout_secs, 300);
        assert_eq!(p.exchange.method, ExchangeMethod::Relay);
        assert_eq!(p.exchange.relay_url.as_deref(), Some(RELAY));
        // Relative paths are read from the config file's folder.
        assert_eq!(
            p.exchange.key_file.as_deref(),
            Some(Path::new("/etc/cis2-agent/client-key.pem"))
        );
        assert_eq!(p.exchange.alg, SigningAlg::RS512);
        assert_eq!(p.exchange.secret_env.as_deref(), Some("CIS2_CLIENT_SECRET"));
        assert_eq!(p.exchange.kid.as_deref(), Some("eps-cpt-ui-int"));

        assert_eq!(
            config.agent.socket.as_deref(),
            Some(Path::new("/run/user/1000/cis2-agent/agent.sock"))
        );
        assert_eq!(config.agent.store, StoreKind::Keyring);
        assert!(!config.agent.audit_sync, "off unless asked for");
        assert_eq!(
            config.agent.data_dir.as_deref(),
            Some(Path::new("/var/lib/cis2-agent"))
        );
        assert_eq!(config.agent.client_policy, Some(ClientPolicy::Ask));
        assert_eq!(config.effective_client_policy(), ClientPolicy::Ask);

        assert_eq!(config.clients.len(), 1);
        let c = &config.clients[0];
        assert_eq!(c.name, "Ward EHR");
        assert_eq!(c.path.as_deref(), Some(Path::new("/opt/ehr/bin/ehr")));
        assert_eq!(
            c.sha256.as_deref(),
            Some(HEX),
            "sha256 is normalised to lower case"
        );
        assert_eq!(
            c.methods.as_deref(),
            Some(&["status", "whoami", "token", "subscribe"].map(String::from)[..])
        );
        assert!(c.audiences.is_empty());
        assert!(c.scopes.is_empty());

        assert_eq!(config.session, SessionConfig::default());
        assert_eq!(config.workstation, WorkstationConfig::default());
    }

    #[test]
    fn defaults_everywhere() {
        let config = ok(&int_with(""));
        let p = config.provider.unwrap();
        assert_eq!(p.scopes, DEFAULT_SCOPES);
        assert_eq!(p.acr_values.as_deref(), Some("AAL2_OR_AAL3_ANY"));
        assert_eq!(p.max_age, Some(300));
        assert_eq!(p.prompt.as_deref(), Some("login"));
        assert_eq!(p.ca_file, None);
        assert_eq!(p.login_timeout_secs, 300);
        assert_eq!(p.exchange.alg, SigningAlg::RS512);
        assert_eq!(config.agent, AgentConfig::default());
        assert_eq!(config.agent.store, StoreKind::Keyring);
        assert!(config.clients.is_empty());
        let s = config.session;
        assert_eq!(
            (
                s.refresh_margin_secs,
                s.expiring_notice_secs,
                s.inactivity_secs,
                s.absolute_secs
            ),
            (60, 120, 900, 43200)
        );
        assert_eq!(s.inactivity_action, InactivityAction::Lock);
        assert!(s.end_session_at_provider);
        let w = config.workstation;
        assert_eq!(
            (w.on_os_lock, w.on_card_removal),
            (SignalAction::Lock, SignalAction::Lock)
        );
        assert!(w.same_card_unlocks);
        assert!(!w.allow_user_switch);
    }

    #[test]
    fn a_script_rule_is_read_and_refused_for_a_native_program_or_a_relative_path() {
        let base = "[[clients]]\nname = \"Ward script\"\npath = \"/usr/bin/python3.11\"\n";
        let c = ok(&format!(
            "{base}script = \"/opt/ward/ward.py\"\nscript_sha256 = \"{}\"\n",
            HEX.to_uppercase()
        ))
        .clients
        .remove(0);
        assert_eq!(c.script.as_deref(), Some(Path::new("/opt/ward/ward.py")));
        assert_eq!(c.script_sha256.as_deref(), Some(HEX));
        let e = bad(&format!("{base}script = \"ward.py\"\n"));
        check(&e, 4, &["script = \"ward.py\"", "absolute path"]);
        let e = bad(&format!("{base}script_sha256 = \"abc\"\n"));
        check(&e, 4, &["script_sha256", "64 hexadecimal digits"]);
        let e = bad(
            "[[clients]]\nname = \"EHR\"\npath = \"/opt/ehr/bin/ehr\"\nscript = \"/opt/x.py\"\n",
        );
        assert!(e.to_string().contains("is not an interpreter"), "{e}");
    }

    #[test]
    fn issuer_with_port_443_survives_byte_for_byte() {
        let issuer = "https://am.nhsdev.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/oidc";
        let text = format!(
            "environment = \"custom\"\n[provider]\nissuer = \"{issuer}\"\nclient_id = \"x\"\n"
        );
        let config = ok(&text);
        assert_eq!(config.provider.unwrap().issuer, issuer);
        // The url crate would have dropped the port: make sure nothing like that happened.
        assert!(!url::Url::parse(issuer).unwrap().as_str().contains(":443"));
        // The presets carry it too.
        assert!(INT_ISSUER.contains(":443/") && LIVE_ISSUER.contains(":443/"));
        // A trailing slash is kept as written as well.
        let text = format!(
            "environment = \"int\"\n[provider]\nissuer = \"{issuer}/\"\nclient_id = \"x\"\n\
             exchange = {{ relay_url = \"{RELAY}\" }}\n"
        );
        assert_eq!(ok(&text).provider.unwrap().issuer, format!("{issuer}/"));
    }

    #[test]
    fn int_and_live_presets_fill_the_issuer_and_default_to_the_relay() {
        let int = ok(&int_with(""));
        assert_eq!(int.environment, Environment::Int);
        let p = int.provider.unwrap();
        assert_eq!(p.issuer, INT_ISSUER);
        assert_eq!(p.exchange.method, ExchangeMethod::Relay);

        let live = ok(&int_with("").replace("\"int\"", "\"live\""));
        assert_eq!(live.environment, Environment::Live);
        assert_eq!(live.provider.unwrap().issuer, LIVE_ISSUER);

        // An explicit issuer wins over the preset.
        let text = int_with("").replace(
            "[provider]\n",
            "[provider]\nissuer = \"https://idp.example.org:443/realm\"\n",
        );
        assert_eq!(
            ok(&text).provider.unwrap().issuer,
            "https://idp.example.org:443/realm"
        );
    }

    #[test]
    fn custom_needs_an_issuer_and_defaults_to_a_public_client() {
        let e = bad("environment = \"custom\"\n\n[provider]\nclient_id = \"x\"\n");
        check(
            &e,
            3,
            &[
                "no issuer",
                "environment = \"custom\"",
                "Add issuer = \"https://",
            ],
        );

        let config = ok(
            "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n",
        );
        let p = config.provider.unwrap();
        assert_eq!(p.exchange.method, ExchangeMethod::None);
        assert_eq!(p.exchange.relay_url, None);
    }

    #[test]
    fn sandbox_presets() {
        let empty = ok("");
        assert_eq!(
            empty,
            Config {
                source: Some("config.toml".into()),
                ..Config::sandbox()
            }
        );
        assert!(empty.is_sandbox());
        assert_eq!(empty.effective_client_policy(), ClientPolicy::Allow);

        let explicit = ok(
            "environment = \"sandbox\"\n[agent]\nstore = \"memory\"\nclient_policy = \"deny\"\n",
        );
        assert!(explicit.is_sandbox());
        assert_eq!(explicit.provider, None);
        assert_eq!(explicit.agent.store, StoreKind::Memory);
        assert_eq!(explicit.effective_client_policy(), ClientPolicy::Deny);

        let built = Config::sandbox();
        assert!(built.is_sandbox() && built.provider.is_none() && built.source.is_none());
        assert_eq!(built.agent.client_policy, None);
        assert_eq!(built.effective_client_policy(), ClientPolicy::Allow);
    }

    #[test]
    fn sandbox_refuses_a_provider_section() {
        let e = bad("environment = \"sandbox\"\n\n\n[provider]\nclient_id = \"x\"\n");
        check(
            &e,
            4,
            &[
                "sandbox",
                "no [provider] section",
                "Remove the [provider] section",
            ],
        );
    }

    #[test]
    fn a_provider_without_environment_is_refused() {
        let e = bad("# CIS2\n[provider]\nclient_id = \"x\"\n");
        check(
            &e,
            2,
            &[
                "no environment",
                "environment = \"int\"",
                "environment = \"custom\"",
            ],
        );
    }

    #[test]
    fn int_without_provider_or_client_id_is_refused() {
        let e = bad("\nenvironment = \"int\"\n[agent]\nstore = \"memory\"\n");
        check(
            &e,
            2,
            &[
                "needs a [provider] section",
                "client_id = \"123456789012.apps.national\"",
            ],
        );

        let e = bad(&int_with("").replace("client_id = \"123456789012.apps.national\"\n", ""));
        check(&e, 2, &["[provider] has no client_id", "Add client_id ="]);

        let e = bad(&int_with("").replace("\"123456789012.apps.national\"", "\"\""));
        check(&e, 3, &["client_id = \"\" is not valid"]);
    }

    #[test]
    fn audiences_are_named_routes_through_the_relay() {
        let c = ok(&int_with(
            "[[provider.audiences]]\nname = \"apim\"\n[[provider.audiences]]\nname = \"pds\"\nroute = \"apim-int\"\n",
        ));
        assert_eq!(
            c.provider.expect("a provider").audiences,
            [
                AudienceRoute {
                    name: "apim".into(),
                    route: "apim".into()
                },
                AudienceRoute {
                    name: "pds".into(),
                    route: "apim-int".into()
                },
            ]
        );
        assert!(
            ok(&int_with(""))
                .provider
                .is_some_and(|p| p.audiences.is_empty())
        );
        let twice =
            "[[provider.audiences]]\nname = \"apim\"\n[[provider.audiences]]\nname = \"apim\"\n";
        check(&bad(&int_with(twice)), 9, &["given twice"]);
        check(
            &bad(&int_with("[[provider.audiences]]\nname = \"a b\"\n")),
            7,
            &["letters, digits", "name = \"apim\""],
        );
        check(
            &bad(&int_with("[[provider.audiences]]\nnme = \"apim\"\n")),
            7,
            &["nme"],
        );
        let direct = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example/r\"\n\
                      client_id = \"x\"\n[[provider.audiences]]\nname = \"apim\"\n";
        check(&bad(direct), 6, &["needs the relay", "method = \"relay\""]);
    }

    #[test]
    fn relay_needs_relay_url() {
        // Explicit method: the method line.
        let text = "environment = \"live\"\n[provider]\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"relay\"\n";
        let e = bad(text);
        check(
            &e,
            5,
            &[
                "method = \"relay\" needs relay_url",
                "Add relay_url = \"https://",
                "method = \"private_key_jwt\"",
            ],
        );

        // No exchange table: the default is the relay, reported at [provider].
        let e = bad("environment = \"int\"\n\n[provider]\nclient_id = \"x\"\n");
        check(
            &e,
            3,
            &[
                "through a relay by default",
                "relay_url",
                "method = \"none\"",
            ],
        );

        // Exchange table without method or relay_url: its header.
        let e = bad(
            "environment = \"int\"\n[provider]\nclient_id = \"x\"\n\n[provider.exchange]\nalg = \"RS256\"\n",
        );
        check(
            &e,
            5,
            &["has no method, so it is \"relay\"", "needs relay_url"],
        );
    }

    #[test]
    fn relay_url_must_be_https_or_loopback_http() {
        let e = bad(&int_with("").replace(RELAY, "http://relay.example.nhs.uk/"));
        check(&e, 5, &["plain http to another computer", "https://"]);
        let e = bad(&int_with("").replace(RELAY, "ftp://relay.example.nhs.uk/"));
        check(
            &e,
            5,
            &[
                "relay_url = \"ftp://relay.example.nhs.uk/\" is not valid",
                "Write relay_url = \"https://",
            ],
        );
        let e = bad(&int_with("").replace(RELAY, "relay.example.nhs.uk"));
        check(&e, 5, &["not a valid URL"]);
        for local in [
            "http://127.0.0.1:8080/",
            "http://[::1]:9000",
            "http://localhost:1234/relay",
        ] {
            let config = ok(&int_with("").replace(RELAY, local));
            assert_eq!(
                config.provider.unwrap().exchange.relay_url.as_deref(),
                Some(local)
            );
        }
    }

    #[test]
    fn private_key_jwt_needs_key_file_and_a_known_alg() {
        let base = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"private_key_jwt\"\n";
        let e = bad(base);
        check(
            &e,
            6,
            &[
                "method = \"private_key_jwt\" needs key_file",
                "Add key_file = \"client-key.pem\"",
            ],
        );

        let config = parse(
            &format!("{base}key_file = \"keys/client.pem\"\nalg = \"RS256\"\n"),
            Path::new("/etc/cis2/config.toml"),
        )
        .unwrap();
        let x = config.provider.unwrap().exchange;
        assert_eq!(x.method, ExchangeMethod::PrivateKeyJwt);
        assert_eq!(
            x.key_file.as_deref(),
            Some(Path::new("/etc/cis2/keys/client.pem"))
        );
        assert_eq!(x.alg, SigningAlg::RS256);

        let e = bad(&format!("{base}key_file = \"k.pem\"\nalg = \"rs256\"\n"));
        check(
            &e,
            8,
            &[
                "alg = \"rs256\" is not valid.",
                "Did you mean \"RS256\"?",
                "Write alg = \"RS256\" or alg = \"RS512\".",
            ],
        );
    }

    #[test]
    fn kid_is_optional_and_kept_as_written() {
        let base = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"k.pem\"\n";
        assert_eq!(ok(base).provider.unwrap().exchange.kid, None);
        let config = ok(&format!("{base}kid = \"cis2-key-2026-11\"\n"));
        let x = config.provider.unwrap().exchange;
        assert_eq!(x.kid.as_deref(), Some("cis2-key-2026-11"));
        let e = bad(&format!("{base}kid = \"\"\n"));
        check(
            &e,
            8,
            &["kid = \"\" is not a key id", "RFC 7638 thumbprint"],
        );
        let e = bad(&format!("{base}kid = 7\n"));
        check(
            &e,
            8,
            &["kid must be text in double quotes, not a whole number"],
        );
        let e = bad(&format!("{base}kdi = \"a\"\n"));
        check(
            &e,
            8,
            &["Did you mean \"kid\"?", "key_file, alg, kid, secret_env."],
        );
    }

    #[test]
    fn client_secret_post_needs_the_name_of_a_variable() {
        let base = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"client_secret_post\"\n";
        let e = bad(base);
        check(
            &e,
            6,
            &[
                "needs secret_env",
                "secret_env = \"CIS2_CLIENT_SECRET\"",
                "never goes in the file",
            ],
        );

        let config = ok(&format!("{base}secret_env = \"MY_SECRET\"\n"));
        let x = config.provider.unwrap().exchange;
        assert_eq!(x.method, ExchangeMethod::ClientSecretPost);
        assert_eq!(x.secret_env.as_deref(), Some("MY_SECRET"));

        // Something that is not a variable name may be the secret itself: never quoted back.
        let e = bad(&format!("{base}secret_env = \"s3cr3t-Va1ue/+==\"\n"));
        check(
            &e,
            7,
            &[
                "not the name of an environment variable",
                "never the secret itself",
            ],
        );
        assert!(!e.to_string().contains("s3cr3t"), "secret echoed: {e}");
    }

    #[test]
    fn audit_sync_is_off_unless_asked_for() {
        assert!(!ok("environment = \"sandbox\"\n").agent.audit_sync);
        assert!(
            ok("environment = \"sandbox\"\n[agent]\naudit_sync = true\n")
                .agent
                .audit_sync
        );
        check(
            &bad("environment = \"sandbox\"\n[agent]\naudit_sync = \"yes\"\n"),
            3,
            &["audit_sync", "true or false"],
        );
    }

    #[test]
    fn a_named_kid_is_read_and_an_unusable_one_is_refused_with_the_fix() {
        let base = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"k.pem\"\n";
        assert_eq!(ok(base).provider.unwrap().exchange.kid, None);
        let config = ok(&format!("{base}kid = \"eps-cpt-ui-int\"\n"));
        assert_eq!(
            config.provider.unwrap().exchange.kid.as_deref(),
            Some("eps-cpt-ui-int")
        );
        for bad_kid in ["\"\"", "\"a.b\"", "\"two words\"", "42"] {
            check(&bad(&format!("{base}kid = {bad_kid}\n")), 8, &["kid"]);
        }
        let e = bad(&format!("{base}kid = \"a.b\"\n"));
        check(&e, 8, &["not a key id", "thumbprint"]);
    }

    #[test]
    fn secrets_in_the_file_are_refused_anywhere() {
        let cases = [
            (
                int_with("client_secret = \"abc\"\n"),
                6,
                "in [provider.exchange]",
            ),
            (
                int_with("").replace("[provider]\n", "[provider]\nclient_secret = \"abc\"\n"),
                3,
                "in [provider]",
            ),
            (
                format!("secret = \"abc\"\n{}", int_with("")),
                1,
                "at the top level",
            ),
            (
                int_with(
                    "[[clients]]\nname = \"a\"\npath = \"/a\"\n[[clients]]\nname = \"b\"\nClient-Secret = \"x\"\n",
                ),
                11,
                "in [[clients]]",
            ),
            (
                int_with("[agent]\nx = { y = [{ secret = \"abc\" }] }\n"),
                7,
                "in [agent.x.y]",
            ),
        ];
        for (text, line, place) in cases {
            let e = bad(&text);
            check(
                &e,
                line,
                &[
                    place,
                    "secrets never go in the config file",
                    "secret_env = \"CIS2_CLIENT_SECRET\"",
                ],
            );
        }
    }

    #[test]
    fn issuer_must_be_https_unless_loopback() {
        let custom = |issuer: &str| {
            format!(
                "environment = \"custom\"\n[provider]\nclient_id = \"x\"\nissuer = \"{issuer}\"\n"
            )
        };
        let e = bad(&custom("http://idp.example.org/realm"));
        check(
            &e,
            4,
            &[
                "issuer = \"http://idp.example.org/realm\" uses plain http to another computer",
                "Use https://",
                "http://127.0.0.1",
            ],
        );
        let e = bad(&custom("ftp://idp.example.org"));
        check(&e, 4, &["must start with https://"]);
        let e = bad(&custom("https://idp.example.org/?realm=a"));
        check(&e, 4, &["?query or #fragment"]);
        let e = bad(&custom("https://idp.example.org/ realm"));
        check(&e, 4, &["no spaces"]);
        for local in [
            "http://127.0.0.1:5556/realms/x",
            "http://[::1]:8080",
            "http://127.0.0.5",
        ] {
            assert_eq!(ok(&custom(local)).provider.unwrap().issuer, local);
        }
    }

    #[test]
    fn scopes_must_include_openid() {
        let e = bad(&int_with("").replace(
            "[provider]\n",
            "[provider]\nscopes = [\"profile\", \"email\"]\n",
        ));
        check(
            &e,
            3,
            &[
                "does not include \"openid\"",
                "write scopes = [\"openid\", \"profile\", \"email\"]",
            ],
        );
        let e = bad(&int_with("").replace(
            "[provider]\n",
            "[provider]\nscopes = [\"openid profile\"]\n",
        ));
        check(&e, 3, &["one word"]);
        let e = bad(&int_with("").replace(
            "[provider]\n",
            "[provider]\nscopes = [\n  \"openid\",\n  7,\n]\n",
        ));
        check(&e, 5, &["scopes contains 7, which is not text"]);
        let config = ok(&int_with("").replace(
            "[provider]\n",
            "[provider]\nscopes = [\"openid\", \"openid\", \"nhsperson\"]\n",
        ));
        assert_eq!(config.provider.unwrap().scopes, ["openid", "nhsperson"]);
    }

    #[test]
    fn max_age_zero_is_allowed_and_prompt_and_acr_can_be_switched_off() {
        let config = ok(&int_with("").replace(
            "[provider]\n",
            "[provider]\nmax_age = 0\nprompt = \"\"\nacr_values = \"\"\n",
        ));
        let p = config.provider.unwrap();
        assert_eq!(p.max_age, Some(0));
        assert_eq!(p.prompt, None);
        assert_eq!(p.acr_values, None);

        let e = bad(&int_with("").replace("[provider]\n", "[provider]\nprompt = \"always\"\n"));
        check(
            &e,
            3,
            &["prompt = \"always\" is not valid.", "prompt = \"login\""],
        );
    }

    #[test]
    fn bad_enum_value_names_the_valid_choices() {
        let e = bad("environment = \"sandbox\"\n[agent]\nstore = \"disk\"\n");
        assert_eq!(
            e.to_string(),
            "config.toml:3: store = \"disk\" is not valid. Write store = \"keyring\" or store = \"memory\"."
        );
        let e = bad("environment = \"INT\"\n");
        check(
            &e,
            1,
            &[
                "Did you mean \"int\"?",
                "environment = \"sandbox\", environment = \"int\", environment = \"live\" or environment = \"custom\"",
            ],
        );
        let e = bad("[workstation]\non_os_lock = \"lock\"\non_card_removal = \"signout\"\n");
        check(
            &e,
            3,
            &["Did you mean \"sign_out\"?", "on_card_removal = \"ignore\""],
        );
        let e = bad("[session]\ninactivity_action = \"off\"\n");
        check(
            &e,
            2,
            &[
                "inactivity_action = \"lock\", inactivity_action = \"sign_out\" or inactivity_action = \"none\"",
            ],
        );
        let e = bad("[agent]\nclient_policy = 1\n");
        check(
            &e,
            2,
            &["client_policy = 1 is not valid.", "client_policy = \"ask\""],
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_a_suggestion() {
        let e = bad(
            "environment = \"sandbox\"\n\n[agent]\nstore = \"memory\"\n\n\nsockett = \"/tmp/a.sock\"\n",
        );
        assert_eq!(
            e.to_string(),
            "config.toml:7: unknown key \"sockett\" in [agent]. Did you mean \"socket\"? Valid keys: socket, store, data_dir, client_policy, audit_sync."
        );

        let e = bad("enviroment = \"int\"\n");
        check(
            &e,
            1,
            &[
                "unknown key \"enviroment\" at the top level.",
                "Did you mean \"environment\"?",
                "[provider]",
                "[[clients]]",
            ],
        );

        let e = bad("[agnet]\nstore = \"memory\"\n");
        check(&e, 1, &["unknown table [agnet].", "Did you mean [agent]?"]);

        let e = bad(&int_with("[provider.exchnage]\nmethod = \"none\"\n"));
        check(
            &e,
            6,
            &[
                "unknown table [provider.exchnage].",
                "Did you mean [provider.exchange]?",
            ],
        );

        let e = bad(&int_with(&format!(
            "[[clients]]\nname = \"a\"\npath = \"/a\"\n\n[[clients]]\nname = \"b\"\nhash = \"{HEX}\"\n"
        )));
        check(
            &e,
            12,
            &[
                "unknown key \"hash\" in [[clients]] entry 2.",
                "Valid keys: name, path, sha256, script, script_sha256, methods, audiences, scopes.",
            ],
        );

        let e = bad("[session]\nidle_secs = 5\n");
        check(
            &e,
            2,
            &[
                "unknown key \"idle_secs\" in [session]",
                "Valid keys: refresh_margin_secs",
            ],
        );
    }

    #[test]
    fn an_unknown_key_with_a_dot_in_its_name_is_named_whole() {
        let e = bad("environment = \"sandbox\"\n[agent]\n\"store.kind\" = \"memory\"\n");
        check(
            &e,
            3,
            &[
                "unknown key \"store.kind\" in [agent].",
                "Valid keys: socket",
            ],
        );
        let e = bad("\"agent.store\" = \"memory\"\n");
        check(&e, 1, &["unknown key \"agent.store\" at the top level."]);
    }

    #[test]
    fn a_key_in_the_wrong_place_says_where_it_belongs() {
        // The classic TOML slip: a top-level key after a [section] heading.
        let e = bad("[agent]\nstore = \"memory\"\nenvironment = \"sandbox\"\n");
        check(
            &e,
            3,
            &[
                "unknown key \"environment\" in [agent]",
                "belongs at the top of the file, before the first [section] heading",
            ],
        );
        let e = bad("environment = \"sandbox\"\nstore = \"memory\"\n");
        check(
            &e,
            2,
            &[
                "unknown key \"store\" at the top level",
                "\"store\" belongs in [agent]",
            ],
        );
    }

    #[test]
    fn toml_syntax_errors_give_a_line() {
        let e = bad("environment = \"sandbox\"\n[agent]\nstore = memory\n");
        check(&e, 3, &["the file is not valid TOML", "double quotes"]);
        let e = bad("environment = \"sandbox\"\n[agent]\nstore = \"memory\"\n\n[agent]\n");
        check(&e, 5, &["not valid TOML", "only once"]);
        let e = bad("[agent\n");
        check(&e, 1, &["not valid TOML"]);
    }

    #[test]
    fn wrong_types_are_refused_with_an_example() {
        let e = bad(&int_with("").replace("[provider]\n", "[provider]\nmax_age = \"300\"\n"));
        check(
            &e,
            3,
            &[
                "max_age = \"300\" is not valid: max_age must be a whole number, not text.",
                "Write max_age = 300.",
            ],
        );
        let e = bad("[workstation]\nsame_card_unlocks = \"yes\"\n");
        check(
            &e,
            2,
            &["must be true or false", "Write same_card_unlocks = true."],
        );
        let e = bad("[session]\nabsolute_secs = 1.5\n");
        check(
            &e,
            2,
            &["not a decimal number", "Write absolute_secs = 43200."],
        );
        let e = bad("[session]\nabsolute_secs = 1979-05-27\n");
        check(&e, 2, &["not a date or time"]);
        let e = bad("agent = \"memory\"\n");
        check(&e, 1, &["agent must be a table", "[agent]"]);
        let e = bad("clients = \"all\"\n");
        check(
            &e,
            1,
            &[
                "clients must be a list of [[clients]] sections",
                "[[clients]]",
            ],
        );
        let e = bad("environment = \"sandbox\"\n[agent]\nsocket = \"\"\n");
        check(&e, 3, &["socket = \"\" is not valid: it is empty."]);
    }

    /// One pair of brackets or two: a section written as the other kind is named as written, with
    /// the heading to write instead.
    #[test]
    fn a_section_written_with_the_wrong_brackets_gets_the_right_heading() {
        let e = bad("[[agent]]\nstore = \"memory\"\n");
        check(
            &e,
            1,
            &[
                "[[agent]] is not valid: agent is one section, so its heading has one pair of brackets.",
                "Write it as a section: a line [agent] followed by its keys.",
            ],
        );
        let e = bad(&int_with("").replace("[provider.exchange]", "[[provider.exchange]]"));
        check(
            &e,
            4,
            &[
                "[[provider.exchange]] is not valid",
                "a line [provider.exchange]",
            ],
        );
        let e = bad("agent = [1]\n");
        check(
            &e,
            1,
            &["agent = [1] is not valid: agent must be a table, not a list."],
        );
        let e = bad("[clients]\nname = \"a\"\npath = \"/a\"\n");
        check(
            &e,
            1,
            &[
                "[clients] is not valid: clients must be a list of [[clients]] sections, not a table.",
                "a line [[clients]], then name = \"Ward EHR\" and path = \"/opt/ehr/bin/ehr\"",
            ],
        );
        let e = bad("[agent]\n[agent.socket]\n");
        check(
            &e,
            2,
            &[
                "[agent.socket] is not valid: socket is a key, not a section.",
                "Write socket = ",
            ],
        );
        let e = bad("[[clients]]\nname = \"a\"\npath = \"/a\"\n[[clients.audiences]]\n");
        check(
            &e,
            4,
            &["[[clients.audiences]] is not valid: audiences is a key, not a section."],
        );
        let e = bad("clients = [1]\n");
        check(
            &e,
            1,
            &["each entry must be a [[clients]] section, not a whole number."],
        );
        let e = bad(&int_with("[provider.audiences]\nname = \"apim\"\n"));
        check(
            &e,
            6,
            &[
                "[provider.audiences] is not valid: audiences must be a list of [[provider.audiences]] sections, not a table.",
                "a line [[provider.audiences]], then name = \"apim\"",
            ],
        );
    }

    #[test]
    fn plain_http_to_another_computer_gets_an_https_example() {
        let e = bad(&int_with("").replace(RELAY, "http://relay.example.nhs.uk/"));
        let words = e.to_string();
        assert!(
            words.ends_with(
                "uses plain http to another computer. Use https://, e.g. relay_url = \
                 \"https://relay.example.nhs.uk/\"; plain http is allowed only when the relay runs \
                 on this computer, e.g. http://127.0.0.1:8080/ or http://[::1]:8080/."
            ),
            "{words}"
        );
    }

    #[test]
    fn client_rules_are_checked() {
        let e = bad("[[clients]]\npath = \"/opt/a\"\n");
        check(
            &e,
            1,
            &["[[clients]] entry 1 has no name", "Add name = \"Ward EHR\""],
        );

        let e = bad(
            "[[clients]]\nname = \"a\"\npath = \"/a\"\n\n[[clients]]\nname = \"Lab\"\nmethods = [\"status\"]\n",
        );
        check(
            &e,
            5,
            &[
                "[[clients]] entry 2 (\"Lab\") has neither path nor sha256",
                "Add path = ",
                "sha256 = ",
            ],
        );

        let e = bad("[[clients]]\nname = \"a\"\nsha256 = \"abc123\"\n");
        check(
            &e,
            3,
            &[
                "sha256 = \"abc123\" in [[clients]] entry 1 is not valid",
                "64 hexadecimal digits",
                "sha256sum",
            ],
        );
        let e = bad(&format!(
            "[[clients]]\nname = \"a\"\nsha256 = \"{}\"\n",
            HEX.replace('0', "g")
        ));
        check(&e, 3, &["64 hexadecimal digits"]);

        let e = bad("[[clients]]\nname = \"a\"\npath = \"bin/ehr\"\n");
        check(
            &e,
            3,
            &["must be the full path", "path = \"/opt/ehr/bin/ehr\""],
        );

        let e = bad(
            "[[clients]]\nname = \"a\"\npath = \"/a\"\nmethods = [\n  \"status\",\n  \"tokens\",\n]\n",
        );
        check(
            &e,
            6,
            &[
                "methods entry \"tokens\" in [[clients]] entry 1 is not a method",
                "Did you mean \"token\"?",
                "Valid methods: status, version, login, whoami, token, change_role, logout, subscribe, activity.",
            ],
        );

        let config = ok(&format!(
            "[[clients]]\nname = \" Lab \"\nsha256 = \"{}\"\naudiences = [\"api://lab\"]\nscopes = [\"nhsperson\"]\n\
             [[clients]]\nname = \"b\"\npath = \"/b\"\nmethods = []\n",
            HEX.to_uppercase()
        ));
        assert_eq!(config.clients.len(), 2);
        let lab = &config.clients[0];
        assert_eq!(lab.name, "Lab");
        assert_eq!(lab.path, None);
        assert_eq!(lab.sha256.as_deref(), Some(HEX));
        assert_eq!(
            lab.methods, None,
            "absent methods = the default (all but logout)"
        );
        assert_eq!(lab.audiences, ["api://lab"]);
        assert_eq!(lab.scopes, ["nhsperson"]);
        assert_eq!(config.clients[1].methods, Some(vec![]));
    }

    #[test]
    fn clients_may_be_inline_tables() {
        let config = ok(
            "clients = [\n  { name = \"a\", path = \"/a\" },\n  { name = \"b\", path = \"/b\" },\n]\n",
        );
        assert_eq!(config.clients.len(), 2);
        assert_eq!(config.clients[1].path.as_deref(), Some(Path::new("/b")));
        let e = bad(
            "clients = [\n  { name = \"a\", path = \"/a\" },\n  { name = \"b\", sha256 = \"nope\" },\n]\n",
        );
        check(
            &e,
            3,
            &["sha256 = \"nope\" in [[clients]] entry 2 is not valid"],
        );
    }

    #[test]
    fn durations_are_checked() {
        let config = ok("[session]\nrefresh_margin_secs = 0\nexpiring_notice_secs = 0\n");
        assert_eq!(config.session.refresh_margin_secs, 0);
        assert_eq!(config.session.expiring_notice_secs, 0);

        let e = bad("[session]\ninactivity_secs = 0\n");
        check(
            &e,
            2,
            &[
                "inactivity_secs = 0 is not valid: it must be between 1 and",
                "write inactivity_action = \"none\"",
            ],
        );
        let config = ok("[session]\ninactivity_action = \"none\"\n");
        assert_eq!(config.session.inactivity_action, InactivityAction::None);

        let e = bad("[session]\n\nabsolute_secs = 0\n");
        check(
            &e,
            3,
            &["absolute_secs = 0 is not valid", "absolute_secs = 43200"],
        );
        let e = bad("[session]\nrefresh_margin_secs = -5\n");
        check(
            &e,
            2,
            &[
                "refresh_margin_secs = -5 is not valid: it must be between 0 and 31622400",
                "Write refresh_margin_secs = 60.",
            ],
        );
        let e = bad("[session]\nabsolute_secs = 99999999999\n");
        check(&e, 2, &["must be between 1 and 31622400"]);
        let e = bad(&int_with("").replace("[provider]\n", "[provider]\nlogin_timeout_secs = 0\n"));
        check(
            &e,
            3,
            &[
                "login_timeout_secs = 0 is not valid",
                "login_timeout_secs = 300",
            ],
        );
    }

    #[test]
    fn redirect_ports_are_checked() {
        let with = |ports: &str| {
            int_with("").replace(
                "[provider]\n",
                &format!("[provider]\nredirect_ports = {ports}\n"),
            )
        };
        assert_eq!(
            ok(&with("[8400, 8401]")).provider.unwrap().redirect_ports,
            [8400, 8401]
        );
        assert!(ok(&with("[]")).provider.unwrap().redirect_ports.is_empty());
        let e = bad(&with("[8400, 0]"));
        check(
            &e,
            3,
            &["redirect_ports entry 0 is not valid", "from 1 to 65535"],
        );
        let e = bad(&with("[70000]"));
        check(&e, 3, &["redirect_ports entry 70000"]);
        let e = bad(&with("[8400, 8400]"));
        check(&e, 3, &["port 8400 twice"]);
        let e = bad(&with("8400"));
        check(
            &e,
            3,
            &[
                "must be a list of port numbers",
                "redirect_ports = [8400, 8401]",
            ],
        );
    }

    #[test]
    fn inline_and_dotted_tables_work() {
        let config = ok(&format!(
            "environment = \"int\"\nprovider.client_id = \"x\"\nprovider.exchange = {{ method = \"relay\", relay_url = \"{RELAY}\" }}\n\
             agent = {{ store = \"memory\" }}\n"
        ));
        assert_eq!(config.provider.unwrap().client_id, "x");
        assert_eq!(config.agent.store, StoreKind::Memory);
        let e = bad(
            "environment = \"int\"\nprovider.client_id = \"x\"\nprovider.exchange = { method = \"relay\" }\n",
        );
        check(&e, 3, &["needs relay_url"]);
        let e = bad(
            "environment = \"int\"\nprovider.client_id = \"x\"\nprovider.exchange = { method = \"relay\", relay = \"x\" }\n",
        );
        check(
            &e,
            3,
            &[
                "unknown key \"relay\" in [provider.exchange]",
                "Did you mean \"relay_url\"?",
            ],
        );
    }

    #[test]
    fn display_with_and_without_a_line() {
        let e = ConfigError {
            file: "/etc/a.toml".into(),
            line: Some(7),
            message: "m.".into(),
            fix: "f.".into(),
        };
        assert_eq!(e.to_string(), "/etc/a.toml:7: m. f.");
        let e = ConfigError { line: None, ..e };
        assert_eq!(e.to_string(), "/etc/a.toml: m. f.");
        let _: &dyn std::error::Error = &e;
    }

    #[test]
    fn load_names_a_missing_file() {
        let path = temp_dir("missing").join("nope.toml");
        let e = load(&path).unwrap_err();
        assert_eq!(e.file, path);
        assert_eq!(e.line, None);
        let text = e.to_string();
        assert!(text.starts_with(&format!("{}: ", path.display())), "{text}");
        assert!(
            text.contains("does not exist") && text.contains("--config"),
            "{text}"
        );
    }

    #[test]
    fn load_reads_the_file_and_checks_key_files() {
        let dir = temp_dir("load");
        let path = dir.join("config.toml");
        let text = "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example.org\"\nclient_id = \"x\"\n\
                    [provider.exchange]\nmethod = \"private_key_jwt\"\nkey_file = \"client-key.pem\"\n";
        std::fs::write(&path, text).unwrap();
        let _ = std::fs::remove_file(dir.join("client-key.pem"));
        // parse() does not touch the disk; load() does.
        assert!(parse(text, &path).is_ok());
        let e = load(&path).unwrap_err();
        check(
            &e,
            7,
            &[
                "key_file = \"client-key.pem\" names a file that does not exist",
                "client-key.pem",
            ],
        );
        assert_eq!(e.file, path);

        std::fs::write(dir.join("client-key.pem"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let config = load(&path).expect("loads");
        assert_eq!(config.source.as_deref(), Some(path.as_path()));
        assert_eq!(
            config.provider.unwrap().exchange.key_file,
            Some(dir.join("client-key.pem"))
        );

        // A byte-order mark is tolerated and lines still count from 1.
        std::fs::write(&path, "\u{feff}[agent]\nstor = \"memory\"\n").unwrap();
        check(
            &load(&path).unwrap_err(),
            2,
            &["unknown key \"stor\"", "Did you mean \"store\"?"],
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_paths_follow_the_contract() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(*v))
            }
        };
        let explicit = env(&[("CIS2_AGENT_CONFIG", "/etc/cis2.toml"), ("HOME", "/home/a")]);
        assert_eq!(
            default_path_with(&explicit, Os::Unix),
            Some("/etc/cis2.toml".into())
        );
        let xdg = env(&[
            ("XDG_CONFIG_HOME", "/x/cfg"),
            ("HOME", "/home/a"),
            ("CIS2_AGENT_CONFIG", ""),
        ]);
        assert_eq!(
            default_path_with(&xdg, Os::Unix),
            Some("/x/cfg/cis2-agent/config.toml".into())
        );
        let home = env(&[("XDG_CONFIG_HOME", "relative"), ("HOME", "/home/a")]);
        assert_eq!(
            default_path_with(&home, Os::Unix),
            Some("/home/a/.config/cis2-agent/config.toml".into())
        );
        assert_eq!(
            default_path_with(&home, Os::Mac),
            Some("/home/a/Library/Application Support/cis2-agent/config.toml".into())
        );
        let windows = env(&[
            ("APPDATA", "C:\\Users\\a\\AppData\\Roaming"),
            ("LOCALAPPDATA", "C:\\Users\\a\\AppData\\Local"),
        ]);
        assert_eq!(
            default_path_with(&windows, Os::Windows),
            Some(
                PathBuf::from("C:\\Users\\a\\AppData\\Roaming")
                    .join("cis2-agent")
                    .join("config.toml")
            )
        );
        let nothing = env(&[]);
        assert_eq!(default_path_with(&nothing, Os::Unix), None);

        assert_eq!(
            default_data_dir_with(&xdg, Os::Unix),
            PathBuf::from("/home/a/.local/share/cis2-agent")
        );
        let xdg_data = env(&[("XDG_DATA_HOME", "/x/data"), ("HOME", "/home/a")]);
        assert_eq!(
            default_data_dir_with(&xdg_data, Os::Unix),
            PathBuf::from("/x/data/cis2-agent")
        );
        assert_eq!(
            default_data_dir_with(&home, Os::Mac),
            PathBuf::from("/home/a/Library/Application Support/cis2-agent")
        );
        assert_eq!(
            default_data_dir_with(&windows, Os::Windows),
            PathBuf::from("C:\\Users\\a\\AppData\\Local").join("cis2-agent")
        );
        let user = env(&[("USER", "alice")]);
        assert_eq!(
            default_data_dir_with(&user, Os::Unix),
            std::env::temp_dir().join("cis2-agent-alice")
        );

        assert_eq!(
            resolve_path(Some(Path::new("/a/b.toml"))),
            Some("/a/b.toml".into())
        );
        assert_eq!(resolve_path(None), default_path());
    }

    #[test]
    fn enums_use_the_file_names_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Environment::Sandbox).unwrap(),
            "\"sandbox\""
        );
        assert_eq!(
            serde_json::to_string(&ExchangeMethod::PrivateKeyJwt).unwrap(),
            "\"private_key_jwt\""
        );
        assert_eq!(
            serde_json::to_string(&ExchangeMethod::ClientSecretPost).unwrap(),
            "\"client_secret_post\""
        );
        assert_eq!(
            serde_json::to_string(&SignalAction::SignOut).unwrap(),
            "\"sign_out\""
        );
        assert_eq!(
            serde_json::to_string(&SigningAlg::RS512).unwrap(),
            "\"RS512\""
        );
        assert_eq!(
            serde_json::from_str::<InactivityAction>("\"none\"").unwrap(),
            InactivityAction::None
        );
        assert_eq!(Environment::Live.to_string(), "live");
        assert_eq!(StoreKind::default(), StoreKind::Keyring);
        assert_eq!(SigningAlg::default(), SigningAlg::RS512);
    }
}
