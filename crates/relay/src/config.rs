//! The relay's TOML (interfaces.md "cis2-relay"). Every mistake is reported with the file, the line and
//! what to write instead; relative paths are read from the config file's folder. A mistake's line
//! is found in the parsed file (`toml_edit`) by the key's path, as the agent's reader does.

use cis2_config_error::{
    UrlProblem, check_http_url, item_at, line_of, span_of, suggest, syntax_error, unknown_field,
};
use cis2_jose::{Alg, SigningKey};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml_edit::{ImDocument, Item};

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub allowed_redirect_uris: Vec<String>,
    pub redis_url: Option<String>,
    pub issuer: String,
    pub client_id: String,
    pub ca_file: Option<PathBuf>,
    pub alg: Alg,
    /// All published in the JWKS; `active` is the one that signs.
    pub keys: Vec<PathBuf>,
    pub active: PathBuf,
    /// `[signing] kids`: the key id registered with CIS2 for a key file, where it is a name rather
    /// than the key's RFC 7638 thumbprint (the default).
    pub kids: std::collections::HashMap<PathBuf, String>,
    pub limits: Limits,
    /// `[[api_platform]]`: the audiences `/v1/exchange` serves (empty: it answers 404 for each).
    pub api_platform: Vec<ApiPlatform>,
}

/// One `[[api_platform]]` registration: where and as whom the relay exchanges an agent's ID token.
#[derive(Debug, Clone)]
pub struct ApiPlatform {
    /// The name agents ask for (`"audience"` in `/v1/exchange`).
    pub audience: String,
    /// The platform's token URL, e.g. `https://int.api.service.nhs.uk/oauth2/token`: the assertion's `aud`.
    pub token_url: String,
    /// The application's API key: the assertion's `iss` and `sub`.
    pub api_key: String,
    /// The private key registered with the platform (signs RS512).
    pub key: PathBuf,
    /// The `kid` it is registered under.
    pub kid: String,
}

/// `[limits]`: what one address may ask and how long anything may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests a minute from one address to the token, refresh, logout and events endpoints.
    pub requests_per_minute: u32,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The longest a token or refresh request may take, the provider's time included.
    pub request_timeout_secs: u64,
    /// How long a client has to send a request's headers, and then its body: slower ones are cut off.
    pub read_timeout_secs: u64,
    /// Open event streams at once (each is one signed-in agent).
    pub max_subscribers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // A trust's whole site may reach the relay from one NAT address at the start of a shift.
            requests_per_minute: 6000,
            max_body_bytes: 16 * 1024,
            request_timeout_secs: 30,
            read_timeout_secs: 10,
            max_subscribers: 20_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    relay: RelaySection,
    provider: ProviderSection,
    signing: SigningSection,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    api_platform: Vec<ApiPlatformSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiPlatformSection {
    audience: String,
    token_url: String,
    api_key: String,
    key: PathBuf,
    kid: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    #[serde(default = "default_listen")]
    listen: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    allowed_redirect_uris: Vec<String>,
    redis_url: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSection {
    issuer: String,
    client_id: String,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningSection {
    #[serde(default = "default_alg")]
    alg: String,
    keys: Vec<PathBuf>,
    active: Option<PathBuf>,
    #[serde(default)]
    kids: std::collections::BTreeMap<PathBuf, String>,
}

fn default_alg() -> String {
    "RS512".into()
}

pub use cis2_config_error::ConfigError;

/// Reads and checks the file; key files are read to check they are usable RSA keys.
pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let message = format!("cannot read the config file: {e}.");
        let fix = "Check the path given with --config and that this user may read it.";
        ConfigError::new(path, None, message, fix)
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &shown, base)
}

/// Checks the text; `base` resolves relative paths. Key files are read.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<RelayConfig, ConfigError> {
    // The relay's messages carry their fix after a semicolon or a dash, in one sentence.
    let error = |line: Option<usize>, message: String| ConfigError::new(file, line, message, "");
    let parsed: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        let message = e.message().trim().to_string();
        let near = unknown_field(&message).and_then(|(key, keys)| suggest(key, keys));
        let hint = if message.contains("missing field") {
            " — see the example in docs/deployment.md: [relay] needs allowed_redirect_uris, \
             [provider] needs issuer and client_id, [signing] needs keys"
                .to_owned()
        } else if let Some(near) = near {
            format!(" — did you mean `{near}`? See docs/deployment.md")
        } else if message.contains("unknown field") {
            " — check the spelling against docs/deployment.md".to_owned()
        } else {
            String::new()
        };
        error(Some(line), format!("{message}{hint}"))
    })?;
    // serde has read the file, so it parses: the document is for where each key is.
    let doc = ImDocument::parse(text)
        .map_err(|e| syntax_error(text, file.into(), e.message(), e.span()))?;
    let line = |item: Option<&Item>| item.and_then(span_of).map(|s| line_of(text, s.start));
    // The key at a dotted path: `relay.listen`, `signing.keys.1`, `api_platform.0.kid`.
    let at = |path: &str, message: String| error(line(item_at(doc.as_item(), path)), message);
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    let listen: SocketAddr = parsed.relay.listen.parse().map_err(|_| {
        at(
            "relay.listen",
            format!(
                "listen = {:?} is not an address and port; write e.g. listen = \"127.0.0.1:8443\"",
                parsed.relay.listen
            ),
        )
    })?;
    let tls = match (&parsed.relay.tls_cert, &parsed.relay.tls_key) {
        (Some(cert), Some(key)) => Some((resolve(cert), resolve(key))),
        (None, None) => None,
        _ => {
            return Err(at(
                if parsed.relay.tls_cert.is_some() {
                    "relay.tls_cert"
                } else {
                    "relay.tls_key"
                },
                "tls_cert and tls_key go together: give both for HTTPS, or neither for plain HTTP \
                 behind a reverse proxy"
                    .into(),
            ));
        }
    };
    if parsed.relay.allowed_redirect_uris.is_empty() {
        return Err(at(
            "relay.allowed_redirect_uris",
            "allowed_redirect_uris is empty, so no sign-in could ever be redeemed; add the agent's \
             redirect URI, e.g. [\"http://127.0.0.1/callback\"]"
                .into(),
        ));
    }
    for (i, uri) in parsed.relay.allowed_redirect_uris.iter().enumerate() {
        if url::Url::parse(uri).is_err() {
            return Err(at(
                &format!("relay.allowed_redirect_uris.{i}"),
                format!("{uri:?} is not a URL; write e.g. \"http://127.0.0.1/callback\""),
            ));
        }
    }
    if let Some(redis) = &parsed.relay.redis_url
        && !(redis.starts_with("redis://") || redis.starts_with("rediss://"))
    {
        return Err(at(
            "relay.redis_url",
            format!("redis_url = {redis:?} must start with redis:// or rediss://"),
        ));
    }

    let issuer = parsed.provider.issuer.clone();
    if let Err(problem) = check_http_url(&issuer, false) {
        let must = "must be an https:// URL (http:// only on loopback, for the sandbox), written \
                    exactly as CIS2 publishes it, :443 included";
        return Err(at(
            "provider.issuer",
            url_mistake("issuer", &issuer, &problem, must),
        ));
    }
    if parsed.provider.client_id.trim().is_empty() {
        return Err(at(
            "provider.client_id",
            "client_id is empty; write the client ID from CIS2's Connection Manager".into(),
        ));
    }

    let alg = match parsed.signing.alg.as_str() {
        "RS512" => Alg::RS512,
        "RS256" => Alg::RS256,
        other => {
            return Err(at(
                "signing.alg",
                format!("alg = {other:?} is not supported; write alg = \"RS512\" or \"RS256\""),
            ));
        }
    };
    if parsed.signing.keys.is_empty() {
        return Err(at(
            "signing.keys",
            "keys is empty; list the PEM files of the signing keys, e.g. keys = [\"keys/2026-11.pem\"]"
                .into(),
        ));
    }
    let keys: Vec<PathBuf> = parsed.signing.keys.iter().map(|k| resolve(k)).collect();
    for (i, key) in keys.iter().enumerate() {
        let at_key = |message| at(&format!("signing.keys.{i}"), message);
        let pem = std::fs::read_to_string(key)
            .map_err(|e| at_key(format!("cannot read the key file {}: {e}", key.display())))?;
        SigningKey::from_pem(&pem, alg).map_err(|e| {
            at_key(format!(
                "{} is not a usable RSA private key ({e}); create one with \
                     `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072`",
                key.display()
            ))
        })?;
    }
    let mut kids = std::collections::HashMap::new();
    for (written, kid) in &parsed.signing.kids {
        let shown = written.display().to_string();
        // The line of this entry (`"keys/a.pem" = "…"`), else the kids table's; the entry's key
        // may hold dots, so it is looked up on its own rather than in a dotted path.
        let kids_table = item_at(doc.as_item(), "signing.kids");
        let entry = kids_table.and_then(|kids| kids.get(shown.as_str()));
        let at_entry = |message: String| error(line(entry).or(line(kids_table)), message);
        let path = resolve(written);
        if !keys.contains(&path) {
            return Err(at_entry(format!(
                "kids names {shown:?}, which is not one of keys; a kid belongs to a listed key file"
            )));
        }
        if let Err(e) = cis2_jose::check_kid(kid) {
            return Err(at_entry(format!(
                "kids: {e}; or leave {shown:?} out to publish its RFC 7638 thumbprint"
            )));
        }
        kids.insert(path, kid.clone());
    }
    let active = match &parsed.signing.active {
        Some(active) => {
            let active = resolve(active);
            if !keys.contains(&active) {
                return Err(at(
                    "signing.active",
                    format!(
                        "active = {:?} is not one of keys; the active key must also be published, \
                         so add it to keys",
                        parsed
                            .signing
                            .active
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    ),
                ));
            }
            active
        }
        None if keys.len() == 1 => keys[0].clone(),
        None => {
            return Err(at(
                "signing.keys",
                "several keys are listed but none is active; add active = \"<one of keys>\" under \
                 [signing]"
                    .into(),
            ));
        }
    };
    let limits = parsed.limits;
    for (key, bad, fix) in [
        (
            "requests_per_minute",
            limits.requests_per_minute == 0,
            "requests_per_minute ≥ 1",
        ),
        (
            "max_body_bytes",
            limits.max_body_bytes < 256,
            "max_body_bytes ≥ 256",
        ),
        (
            "request_timeout_secs",
            limits.request_timeout_secs == 0,
            "request_timeout_secs ≥ 1",
        ),
        (
            "read_timeout_secs",
            limits.read_timeout_secs == 0,
            "read_timeout_secs ≥ 1",
        ),
        (
            "max_subscribers",
            limits.max_subscribers == 0,
            "max_subscribers ≥ 1",
        ),
    ] {
        if bad {
            return Err(at(
                &format!("limits.{key}"),
                format!("[limits] needs {fix}"),
            ));
        }
    }

    let api_platform = api_platforms(&parsed.api_platform, &resolve, &at)?;

    Ok(RelayConfig {
        listen,
        tls,
        allowed_redirect_uris: parsed.relay.allowed_redirect_uris,
        redis_url: parsed.relay.redis_url,
        issuer,
        client_id: parsed.provider.client_id,
        ca_file: parsed.provider.ca_file.map(|p| resolve(&p)),
        alg,
        keys,
        active,
        kids,
        limits,
        api_platform,
    })
}

/// Checks the `[[api_platform]]` entries; each key file is read to check it is a usable RSA key.
/// `at` places a message at a key path of the file.
fn api_platforms(
    entries: &[ApiPlatformSection],
    resolve: &dyn Fn(&Path) -> PathBuf,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<ApiPlatform>, ConfigError> {
    let mut out: Vec<ApiPlatform> = Vec::new();
    for (n, entry) in entries.iter().enumerate() {
        // A mistake is reported at its key within this entry.
        let at = |key: &str, message: String| {
            at(
                &format!("api_platform.{n}.{key}"),
                format!("[[api_platform]] {message}"),
            )
        };
        let name_ok = (1..=64).contains(&entry.audience.len())
            && entry
                .audience
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(at(
                "audience",
                format!(
                    "audience = {:?} must be 1 to 64 letters, digits, - _ or .; write e.g. audience = \"apim\"",
                    entry.audience
                ),
            ));
        }
        if out.iter().any(|o| o.audience == entry.audience) {
            return Err(at(
                "audience",
                format!(
                    "audience = {:?} is given twice; each [[api_platform]] needs its own name",
                    entry.audience
                ),
            ));
        }
        if let Err(problem) = check_http_url(&entry.token_url, true) {
            let must = "must be an https:// URL (http:// only on loopback, for the sandbox); \
                        write e.g. token_url = \"https://int.api.service.nhs.uk/oauth2/token\"";
            let message = url_mistake("token_url", &entry.token_url, &problem, must);
            return Err(at("token_url", message));
        }
        if entry.api_key.trim().is_empty() || entry.api_key.chars().any(char::is_whitespace) {
            return Err(at(
                "api_key",
                "api_key must be the application's API key from the API Platform's developer \
                 portal (one word)"
                    .into(),
            ));
        }
        let key = resolve(&entry.key);
        let pem = std::fs::read_to_string(&key).map_err(|e| {
            at(
                "key",
                format!("cannot read the key file {}: {e}", key.display()),
            )
        })?;
        SigningKey::from_pem(&pem, Alg::RS512).map_err(|e| {
            at(
                "key",
                format!(
                    "{} is not a usable RSA private key ({e}); create one with \
                     `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096`",
                    key.display()
                ),
            )
        })?;
        if let Err(e) = cis2_jose::check_kid(&entry.kid) {
            return Err(at(
                "kid",
                format!(
                    "kid: {e}; write the kid the key was registered under, e.g. kid = \"int-1\""
                ),
            ));
        }
        out.push(ApiPlatform {
            audience: entry.audience.clone(),
            token_url: entry.token_url.clone(),
            api_key: entry.api_key.clone(),
            key,
            kid: entry.kid.clone(),
        });
    }
    Ok(out)
}

/// An address the shared rule refuses: not https (or http to another computer) gets what it must
/// be; any other problem is named.
fn url_mistake(key: &str, value: &str, problem: &UrlProblem, must: &str) -> String {
    match problem {
        UrlProblem::NotHttps | UrlProblem::PlainHttpToAnotherComputer => {
            format!("{key} = {value:?} {must}")
        }
        other => format!("{key} = {value:?} is not valid: {other}; it {must}"),
    }
}

/// Whether `uri` is one of the allowed redirect URIs. Loopback entries (`http://127.0.0.1`,
/// `http://[::1]`, `http://localhost`) match any port, as RFC 8252 §7.3 asks; others match exactly.
pub fn redirect_allowed(allowed: &[String], uri: &str) -> bool {
    let Ok(asked) = url::Url::parse(uri) else {
        return false;
    };
    allowed.iter().any(|entry| {
        let Ok(entry) = url::Url::parse(entry) else {
            return false;
        };
        let loopback = entry.scheme() == "http"
            && matches!(entry.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"));
        if loopback {
            asked.scheme() == "http"
                && asked.host_str() == entry.host_str()
                && asked.path() == entry.path()
                && asked.query() == entry.query()
                && asked.fragment().is_none()
                && asked.username().is_empty()
                && asked.password().is_none()
        } else {
            asked == entry
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, name: &str) {
        std::fs::write(
            dir.join(name),
            SigningKey::generate(Alg::RS512).to_pkcs8_pem(),
        )
        .unwrap();
    }

    fn good(extra: &str) -> String {
        format!(
            "[relay]\nlisten = \"127.0.0.1:0\"\nallowed_redirect_uris = [\"http://127.0.0.1/callback\"]\n\
             [provider]\nissuer = \"https://cis2.example:443/realms/Healthcare\"\nclient_id = \"1.apps.national\"\n\
             [signing]\nkeys = [\"a.pem\", \"b.pem\"]\nactive = \"b.pem\"\n{extra}"
        )
    }

    #[test]
    fn a_misspelt_key_gets_a_suggestion_from_the_keys_serde_knows() {
        let err = parse(
            &good("").replace("listen", "listn"),
            "relay.toml",
            Path::new("."),
        );
        let err = err.unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("did you mean `listen`?"), "{err}");
        let err = parse(
            &good("").replace("listen", "port"),
            "relay.toml",
            Path::new("."),
        );
        let err = err.unwrap_err();
        assert!(err.message.contains("check the spelling"), "{err}");
        assert!(!err.message.contains("did you mean"), "{err}");
    }

    #[test]
    fn a_good_file_loads_with_paths_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        let config = parse(&good(""), "relay.toml", dir.path()).unwrap();
        assert_eq!(config.active, dir.path().join("b.pem"));
        assert_eq!(config.keys.len(), 2);
        assert_eq!(config.alg, Alg::RS512);
        assert_eq!(config.limits.max_body_bytes, 16 * 1024);
    }

    #[test]
    fn a_key_may_be_published_under_a_named_kid() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        let config = parse(
            &good("kids = { \"b.pem\" = \"relay-2026-11\" }\n"),
            "relay.toml",
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            config
                .kids
                .get(&dir.path().join("b.pem"))
                .map(String::as_str),
            Some("relay-2026-11")
        );
        assert!(!config.kids.contains_key(&dir.path().join("a.pem")));
        for (extra, line, words) in [
            ("kids = { \"c.pem\" = \"x\" }\n", 10, "not one of keys"),
            ("kids = { \"b.pem\" = \"a.b\" }\n", 10, "thumbprint"),
            (
                "[signing.kids]\n\"b.pem\" = \"has space\"\n",
                11,
                "not usable",
            ),
        ] {
            let err = parse(&good(extra), "relay.toml", dir.path()).unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        let cases = [
            (good("").replace("listen", "listn"), 2, "unknown field"),
            (
                good("").replace("active = \"b.pem\"", "active = \"c.pem\""),
                9,
                "add it to keys",
            ),
            (
                good("").replace("active = \"b.pem\"", ""),
                8,
                "none is active",
            ),
            (
                good("").replace("\"b.pem\"]", "\"missing.pem\"]"),
                8,
                "cannot read the key file",
            ),
            (
                good("").replace("https://cis2", "http://cis2"),
                5,
                "must be an https:// URL",
            ),
            (
                good("").replace("127.0.0.1:0", "localhost"),
                2,
                "not an address and port",
            ),
            (good("alg = \"HS256\"\n"), 10, "RS512"),
            (
                good("").replace("[\"http://127.0.0.1/callback\"]", "[]"),
                3,
                "no sign-in could ever",
            ),
            (
                good("").replace("[relay]\n", "[relay]\ntls_cert = \"c.pem\"\n"),
                2,
                "go together",
            ),
            (
                good("[limits]\nrequests_per_minute = 0\n"),
                11,
                "requests_per_minute ≥ 1",
            ),
        ];
        for (text, line, words) in cases {
            let err = parse(&text, "relay.toml", dir.path()).unwrap_err();
            assert_eq!(err.file, Path::new("relay.toml"));
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    /// The issuer is judged by the same rule as the agent's (`check_http_url`): any loopback
    /// address may be plain http, and a fragment or a space is named.
    #[test]
    fn the_issuer_is_judged_as_the_agent_judges_it() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        let with_issuer =
            |issuer: &str| good("").replace("https://cis2.example:443/realms/Healthcare", issuer);
        for loopback in [
            "http://127.0.0.2:9000/realms/x",
            "http://[::1]:9000/x",
            "http://localhost/x",
        ] {
            let config = parse(&with_issuer(loopback), "relay.toml", dir.path());
            assert_eq!(config.map(|c| c.issuer).ok().as_deref(), Some(loopback));
        }
        for (issuer, words) in [
            (
                "https://cis2.example:443/realms/Healthcare#x",
                "is not valid: it must not have a ?query or #fragment; it must be an https:// URL",
            ),
            (
                "https://cis2.example:443/realms/ Healthcare",
                "is not valid: a URL has no spaces",
            ),
            (
                "http://127.0.0.1.example/x",
                "must be an https:// URL (http:// only on loopback",
            ),
        ] {
            let err = parse(&with_issuer(issuer), "relay.toml", dir.path()).unwrap_err();
            assert_eq!(err.line, Some(5), "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    #[test]
    fn api_platform_registrations_load_and_their_mistakes_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        write_key(dir.path(), "apim.pem");
        let entry = "[[api_platform]]\naudience = \"apim\"\n\
                     token_url = \"https://int.api.service.nhs.uk/oauth2/token\"\n\
                     api_key = \"abc123\"\nkey = \"apim.pem\"\nkid = \"int-1\"\n";
        let config = parse(&good(entry), "relay.toml", dir.path()).unwrap();
        assert_eq!(config.api_platform.len(), 1);
        assert_eq!(config.api_platform[0].audience, "apim");
        assert_eq!(config.api_platform[0].key, dir.path().join("apim.pem"));
        assert_eq!(config.api_platform[0].kid, "int-1");
        assert!(
            parse(&good(""), "relay.toml", dir.path())
                .unwrap()
                .api_platform
                .is_empty()
        );
        let cases = [
            (entry.replace("\"apim\"", "\"a b\""), 11, "audience"),
            (entry.replace("https://int", "http://int"), 12, "https://"),
            (entry.replace("\"abc123\"", "\"\""), 13, "API key"),
            (entry.replace("apim.pem", "none.pem"), 14, "cannot read"),
            (entry.replace("\"int-1\"", "\"a.b\""), 15, "kid"),
            (entry.replace("kid =", "kidd ="), 15, "unknown field"),
            (format!("{entry}{entry}"), 17, "twice"),
        ];
        for (extra, line, words) in cases {
            let err = parse(&good(&extra), "relay.toml", dir.path()).unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    /// The line comes from the parsed file, not a search of its text: a key of the same name in an
    /// earlier `[[api_platform]]` entry, a quoted key written with single quotes, or a table
    /// written inline does not move it.
    #[test]
    fn each_mistake_names_its_own_line_wherever_the_key_is_written() {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), "a.pem");
        write_key(dir.path(), "b.pem");
        write_key(dir.path(), "apim.pem");
        let entry = |name: &str, url: &str| {
            format!(
                "[[api_platform]] # {name}\naudience = \"{name}\"\ntoken_url = \"{url}\"\n\
                 api_key = \"abc123\"\nkey = \"apim.pem\"\nkid = \"int-1\"\n"
            )
        };
        let good_url = "https://int.api.service.nhs.uk/oauth2/token";
        let two_entries = format!(
            "{}{}",
            entry("apim", good_url),
            entry("apim-live", "http://api.service.nhs.uk/oauth2/token")
        );
        let cases = [
            (good(&two_entries), 18, "https://"),
            (
                good("[signing.kids]\n'b.pem' = \"has space\"\n"),
                11,
                "not usable",
            ),
            (
                format!(
                    "# limits first\nlimits = {{ requests_per_minute = 0 }}\n{}",
                    good("")
                ),
                2,
                "requests_per_minute ≥ 1",
            ),
        ];
        for (text, line, words) in cases {
            let err = parse(&text, "relay.toml", dir.path()).unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
            assert!(err.message.contains(words), "{err}");
            assert!(
                !err.message.contains("  "),
                "one space between words: {err}"
            );
        }
    }

    #[test]
    fn loopback_redirects_match_any_port_and_nothing_else() {
        let allowed = vec![
            "http://127.0.0.1/callback".to_string(),
            "https://app.example/cb".to_string(),
        ];
        assert!(redirect_allowed(
            &allowed,
            "http://127.0.0.1:49152/callback"
        ));
        assert!(redirect_allowed(&allowed, "http://127.0.0.1/callback"));
        assert!(redirect_allowed(&allowed, "https://app.example/cb"));
        for refused in [
            "http://127.0.0.1:49152/other",
            "http://127.0.0.2:49152/callback",
            "https://127.0.0.1:49152/callback",
            "http://127.0.0.1:49152/callback?x=1",
            "http://user@127.0.0.1:49152/callback",
            "http://evil.example/callback",
            "https://app.example:444/cb",
            "https://app.example/cb/",
            "not a url",
        ] {
            assert!(!redirect_allowed(&allowed, refused), "{refused}");
        }
    }
}
