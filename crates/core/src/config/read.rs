//! Reading the file. serde reads it into the public types: each table is `deny_unknown_fields`, so
//! its valid keys are its fields and serde's error lists them; `serde_path_to_error` says which key
//! a serde error is about and the `toml_edit` document where that key is. What is ours: secrets
//! refused under any key (before serde, which would only call them unknown), the rules for values
//! and between keys, and for every mistake the sentence that says how to fix it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use cis2_config_error::{
    UrlProblem, check_http_url, item_at, line_of, span_of, suggest, syntax_error, unknown_field,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use toml_edit::{ImDocument, Item, Value};

use super::paths::{Os, env_var, home_dir};
use super::*;

type Span = Option<Range<usize>>;
type Checked = Result<(), ConfigError>;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawFile {
    environment: Option<Environment>,
    provider: Option<ProviderConfig>,
    agent: AgentConfig,
    clients: Vec<ClientRule>,
    session: SessionConfig,
    workstation: WorkstationConfig,
}

const ISSUER_EXAMPLE: &str = "\"https://login.example.org/realms/staff\"";
const CLIENT_ID_EXAMPLE: &str = "\"123456789012.apps.national\"";
const RELAY_EXAMPLE: &str = "\"https://relay.example.nhs.uk/\"";
const SHA_EXAMPLE: &str = "\"<64 hex digits>\"";
// The example in a message is one the reader's OS would report.
const PATH_EXAMPLE: &str = if cfg!(windows) {
    r"'C:\Program Files\Ward EHR\ehr.exe'"
} else {
    "\"/opt/ehr/bin/ehr\""
};
const PROMPT_VALUES: &[&str] = &["login", "none", "consent", "select_account"];
const SECRET_KEYS: &[&str] = &["client_secret", "clientsecret", "secret"];
/// An example value of a key (its default where it has one), for the fix.
fn example(key: &str) -> &'static str {
    match key {
        "issuer" => ISSUER_EXAMPLE,
        "client_id" => CLIENT_ID_EXAMPLE,
        "relay_url" => RELAY_EXAMPLE,
        "scopes" => "[\"openid\", \"profile\"]",
        "acr_values" => "\"AAL2_OR_AAL3_ANY\"",
        "max_age" | "login_timeout_secs" => "300",
        "prompt" => "\"login\"",
        "ca_file" => "\"/etc/cis2-agent/extra-ca.pem\"",
        "redirect_ports" => "[8400, 8401]",
        "route" => "\"apim\"",
        "key_file" => "\"client-key.pem\"",
        "kid" => "\"eps-cpt-ui-int\"",
        "secret_env" => "\"CIS2_CLIENT_SECRET\"",
        "socket" => "\"/run/user/1000/cis2-agent/agent.sock\"",
        "data_dir" => "\"/var/lib/cis2-agent\"",
        "audit_sync" | "allow_user_switch" => "false",
        "same_card_unlocks" | "end_session_at_provider" => "true",
        "name" => "\"Ward EHR\"",
        "path" => PATH_EXAMPLE,
        "sha256" | "script_sha256" => SHA_EXAMPLE,
        "script" => "\"/opt/ehr/ehr.py\"",
        "methods" => "[\"status\", \"whoami\", \"token\"]",
        "audiences" => "[\"https://ehr.example.nhs.uk\"]",
        "refresh_margin_secs" => "60",
        "expiring_notice_secs" => "120",
        "inactivity_secs" => "900",
        "absolute_secs" => "43200",
        _ => "\"…\"",
    }
}

/// Whether a key is a duration in seconds; its least value, and the fix for a 0 below it.
fn secs_rule(key: &str) -> Option<(u64, Option<&'static str>)> {
    let least = |fix| Some((1, Some(fix)));
    match key {
        "login_timeout_secs" => {
            least("A sign-in needs some time in the browser: write login_timeout_secs = 300.")
        }
        "inactivity_secs" => least(
            "To switch the inactivity timeout off, write inactivity_action = \"none\" instead; \
             otherwise write inactivity_secs = 900.",
        ),
        "absolute_secs" => {
            least("A session needs a maximum length: write absolute_secs = 43200 (12 hours).")
        }
        "max_age" | "refresh_margin_secs" | "expiring_notice_secs" => Some((0, None)),
        _ => None,
    }
}

/// What the file named by a path key holds, for messages.
fn file_what(key: &str) -> &'static str {
    match key {
        "ca_file" => "a PEM file of extra CA certificates",
        "key_file" => "the PEM file holding the client's RSA private key",
        "socket" => "the agent's socket",
        _ => "the agent's data folder",
    }
}

/// The values a key that picks one of a few may take, as the file writes them.
fn choices(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "environment" => Environment::NAMES,
        "method" => ExchangeMethod::NAMES,
        "alg" => SigningAlg::NAMES,
        "store" => StoreKind::NAMES,
        "client_policy" => ClientPolicy::NAMES,
        "on_os_lock" | "on_card_removal" => SignalAction::NAMES,
        "inactivity_action" => InactivityAction::NAMES,
        _ => return None,
    })
}

/// The keys a table takes, from serde itself: its error for a key it does not know lists them.
fn keys_of<T: DeserializeOwned>() -> Vec<String> {
    let error = toml::from_str::<T>("\"\" = 0").err();
    let keys = error.as_ref().and_then(|e| unknown_field(e.message()));
    keys.map(|(_, keys)| keys.into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Each table's dotted path and keys: to tell someone who put a key in the wrong table where it goes.
fn tables() -> [(&'static str, Vec<String>); 8] {
    [
        ("", keys_of::<RawFile>()),
        ("provider", keys_of::<ProviderConfig>()),
        ("provider.exchange", keys_of::<Exchange>()),
        ("agent", keys_of::<AgentConfig>()),
        ("session", keys_of::<SessionConfig>()),
        ("workstation", keys_of::<WorkstationConfig>()),
        ("clients", keys_of::<ClientRule>()),
        ("provider.audiences", keys_of::<AudienceRoute>()),
    ]
}

/// Where a table (and which entry of a list of tables) is, in the words of a message.
fn place(table: &str, entry: Option<usize>) -> String {
    match (table, entry) {
        ("", _) => "at the top level".to_owned(),
        ("clients" | "provider.audiences", Some(i)) => format!("in [[{table}]] entry {}", i + 1),
        ("clients" | "provider.audiences", None) => format!("in [[{table}]]"),
        _ => format!("in [{table}]"),
    }
}

fn join_path(parent: &str, key: &str) -> String {
    match parent {
        "" => key.to_owned(),
        parent => format!("{parent}.{key}"),
    }
}

/// How a key is shown in lists and suggestions: tables as `[provider]`, the clients list as
/// `[[clients]]`, plain keys bare.
fn display_key(parent: &str, key: &str) -> String {
    let path = join_path(parent, key);
    let table = tables().into_iter().any(|(table, _)| table == path);
    match path.as_str() {
        "clients" => format!("[[{path}]]"),
        "" | "provider.audiences" => key.to_owned(),
        _ if table => format!("[{path}]"),
        _ => key.to_owned(),
    }
}

/// `a`, `a or b`, `a, b or c`.
fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// For a list of tables, the keys of an entry as a fix writes them.
fn list_of_tables(path: &str) -> Option<&'static str> {
    match path {
        "clients" => Some("name = \"Ward EHR\" and path = \"/opt/ehr/bin/ehr\""),
        "provider.audiences" => Some("name = \"apim\""),
        _ => None,
    }
}

/// A key path (`clients.1.sha256`, `provider.scopes.0`) in parts: the table holding the key
/// (`clients`), which entry of a list of tables, the key, and whether the path ends at an entry of
/// a list value.
fn parts(path: &str) -> (String, Option<usize>, &str, bool) {
    let index = |s: &&str| s.parse::<usize>().ok();
    let mut steps: Vec<&str> = path.split('.').collect();
    let element = steps.len() > 1 && steps.last().and_then(index).is_some();
    if element {
        steps.pop();
    }
    let key = steps.pop().unwrap_or_default();
    let entry = steps.last().and_then(index);
    let table: Vec<&str> = steps.into_iter().filter(|s| index(s).is_none()).collect();
    (table.join("."), entry, key, element)
}

/// What was written, in the words of our messages.
fn kind(item: Option<&Item>) -> &'static str {
    match item {
        Some(Item::Value(Value::String(_))) => "text",
        Some(Item::Value(Value::Integer(_))) => "a whole number",
        Some(Item::Value(Value::Float(_))) => "a decimal number",
        Some(Item::Value(Value::Boolean(_))) => "true/false",
        Some(Item::Value(Value::Datetime(_))) => "a date or time",
        Some(Item::Value(Value::Array(_)) | Item::ArrayOfTables(_)) => "a list",
        _ => "a table",
    }
}

struct Reader<'a> {
    text: &'a str,
    file: &'a Path,
    doc: ImDocument<&'a str>,
    base: PathBuf,
    check_files: bool,
}

impl Reader<'_> {
    fn err(&self, span: &Span, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        let line = span.as_ref().map(|s| line_of(self.text, s.start));
        ConfigError::new(self.file, line, message, fix)
    }

    /// The item at a key path, if the file gives it.
    fn item(&self, path: &str) -> Option<&Item> {
        item_at(self.doc.as_item(), path)
    }

    /// Where a key path is: its value, or a table's header, else the table's first key.
    fn span(&self, path: &str) -> Span {
        self.item(path).and_then(span_of)
    }

    /// The source text of a value, for quoting it back: first line only, at most 60 characters.
    fn snippet(&self, span: &Span) -> String {
        let raw = span.as_ref().and_then(|r| self.text.get(r.clone()));
        let raw = raw.unwrap_or("").trim();
        let first_line = raw.lines().next().unwrap_or("").trim_end();
        let short: String = first_line.chars().take(60).collect();
        if short.len() < raw.len() {
            format!("{short}…")
        } else {
            short
        }
    }

    /// The error for the value at `path`. In `message`, `{at}` stands for `key = value` as written
    /// (with the `[[clients]]` entry it is in), `{shown}` for the value and `{in}` for the entry.
    fn at(&self, path: &str, message: &str, fix: impl Into<String>) -> ConfigError {
        let span = self.span(path);
        let (table, entry, key, _) = parts(path);
        let label = match entry {
            Some(i) if table == "clients" => format!(" in [[clients]] entry {}", i + 1),
            _ => String::new(),
        };
        let shown = self.snippet(&span);
        let message = message
            .replace("{at}", &format!("{key} = {shown}{label}"))
            .replace("{shown}", &shown)
            .replace("{in}", &label);
        self.err(&span, message, fix)
    }

    /// [`Reader::at`] when `bad`.
    fn rule(&self, bad: bool, path: &str, message: &str, fix: impl Into<String>) -> Checked {
        match bad {
            true => Err(self.at(path, message, fix)),
            false => Ok(()),
        }
    }

    /// Refuses a key named like a secret anywhere in `item`: its tables, lists and inline tables.
    fn refuse_secrets(&self, item: &Item, table: &str) -> Checked {
        for (key, value) in item.as_table_like().into_iter().flat_map(|t| t.iter()) {
            if SECRET_KEYS.contains(&key.to_lowercase().replace('-', "_").as_str()) {
                let key_span = item.as_table_like().and_then(|t| t.key(key)?.span());
                return Err(self.err(
                    &key_span.or_else(|| value.span()),
                    format!(
                        "\"{key}\" {}: secrets never go in the config file.",
                        place(table, None)
                    ),
                    "Remove it, put the secret in an environment variable of the agent, and name \
                     that variable in [provider.exchange]: method = \"client_secret_post\" and \
                     secret_env = \"CIS2_CLIENT_SECRET\".",
                ));
            }
            self.refuse_secrets(value, &join_path(table, key))?;
        }
        let list = item
            .as_array()
            .into_iter()
            .flatten()
            .cloned()
            .map(Item::Value);
        let tables = item.as_array_of_tables().into_iter().flatten().cloned();
        list.chain(tables.map(Item::Table))
            .try_for_each(|item| self.refuse_secrets(&item, table))
    }

    /// A serde error as our sentence: an unknown key or table (with the nearest valid one or the
    /// table it belongs in), or a value of the wrong type or not among the choices.
    fn serde_error(&self, e: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let steps = e.path().iter().map(|step| match step {
            Segment::Seq { index } => index.to_string(),
            Segment::Map { key } => key.clone(),
            _ => String::new(),
        });
        let mut steps: Vec<String> = steps.collect();
        let (message, serde_span) = (e.inner().message(), e.inner().span());
        if let Some((key, allowed)) = unknown_field(message) {
            // The unknown key may itself contain a dot: it is kept apart from its table's path.
            steps.pop();
            return self.unknown_key(&steps.join("."), key, &allowed, &serde_span);
        }
        let path = steps.join(".");
        let (table, _, key, element) = parts(&path);
        let (shown, found) = (self.snippet(&serde_span), kind(self.item(&path)));
        if key == "redirect_ports" && element {
            return self.bad_port(&serde_span);
        } else if secs_rule(key).is_some() && message.starts_with("invalid value: integer") {
            return self.bad_secs(&path, false);
        }
        let whole = join_path(&table, key);
        let owner = match element {
            true => path
                .rsplit_once('.')
                .map_or(path.as_str(), |(owner, _)| owner),
            false => &path,
        };
        let whole_item = self.item(owner);
        let written = match whole_item {
            Some(Item::Table(_)) => format!("[{whole}]"),
            Some(Item::ArrayOfTables(_)) => format!("[[{whole}]]"),
            _ => format!("{key} = {}", self.snippet(&whole_item.and_then(span_of))),
        };
        let (message, fix) = if let Some(entry) = list_of_tables(&whole) {
            let message = match element {
                true => format!(
                    "{written} is not valid: each entry must be a [[{whole}]] section, not {found}."
                ),
                false => format!(
                    "{written} is not valid: {key} must be a list of [[{whole}]] sections, not {}.",
                    kind(whole_item)
                ),
            };
            (
                message,
                format!(
                    "Write each as its own section: a line [[{whole}]], then {entry} on the lines below."
                ),
            )
        } else if display_key(&table, key).starts_with('[') {
            let message = match whole_item {
                Some(Item::ArrayOfTables(_)) => format!(
                    "{written} is not valid: {key} is one section, so its heading has one pair of \
                     brackets."
                ),
                _ => format!(
                    "{written} is not valid: {key} must be a table, not {}.",
                    kind(whole_item)
                ),
            };
            (
                message,
                format!("Write it as a section: a line [{whole}] followed by its keys."),
            )
        } else if matches!(whole_item, Some(Item::Table(_) | Item::ArrayOfTables(_))) {
            (
                format!("{written} is not valid: {key} is a key, not a section."),
                format!(
                    "Write {key} = {} among the keys of its section.",
                    example(key)
                ),
            )
        } else if element {
            let message = format!("{key} contains {shown}, which is not text in double quotes.");
            (
                message,
                format!(
                    "Write each entry in double quotes, e.g. {key} = {}.",
                    example(key)
                ),
            )
        } else if let Some(names) = choices(key) {
            let written = self.item(&path).and_then(Item::as_str);
            let near = written.and_then(|s| suggest(s, names.iter().copied()));
            let near = near.map(|n| format!("Did you mean \"{n}\"? "));
            let options: Vec<String> = names.iter().map(|n| format!("{key} = \"{n}\"")).collect();
            let fix = format!("{}Write {}.", near.unwrap_or_default(), join_or(&options));
            (format!("{key} = {shown} is not valid."), fix)
        } else {
            let wanted = match message {
                _ if key == "redirect_ports" => "a list of port numbers",
                m if m.contains("expected a boolean") => "true or false (without quotes)",
                m if m.contains("expected a sequence") => "a list in square brackets",
                m if m.contains("expected u") || m.contains("expected i") => "a whole number",
                _ => "text in double quotes",
            };
            let message =
                format!("{key} = {shown} is not valid: {key} must be {wanted}, not {found}.");
            (message, format!("Write {key} = {}.", example(key)))
        };
        // A table of the wrong kind is named at its heading, not at a key inside it.
        let span = match whole_item {
            Some(Item::ArrayOfTables(list)) => list.get(0).and_then(|entry| entry.span()),
            Some(Item::Table(table)) => table.span(),
            _ => None,
        };
        self.err(&span.or(serde_span), message, fix)
    }

    fn unknown_key(&self, parent: &str, key: &str, allowed: &[&str], span: &Span) -> ConfigError {
        let (table, entry, _, _) = parts(&join_path(parent, "key"));
        let full = join_path(&table, key);
        let item = self.item(parent).and_then(|t| t.get(key));
        let message = match item {
            Some(Item::ArrayOfTables(_)) => format!("unknown table [[{full}]]."),
            Some(Item::Table(_)) => format!("unknown table [{full}]."),
            _ => format!("unknown key \"{key}\" {}.", place(&table, entry)),
        };
        let mut fix = String::new();
        if let Some(near) = suggest(key, allowed.iter().copied()) {
            fix = match display_key(&table, near) {
                shown if shown.starts_with('[') => format!("Did you mean {shown}? "),
                shown => format!("Did you mean \"{shown}\"? "),
            };
        } else if let Some((home, _)) = tables().iter().find(|(_, k)| k.iter().any(|k| k == key)) {
            let home = match *home {
                "" => "at the top of the file, before the first [section] heading".to_owned(),
                home => place(home, None),
            };
            fix = format!("\"{key}\" belongs {home}: move it there. ");
        }
        let valid: Vec<String> = allowed.iter().map(|k| display_key(&table, k)).collect();
        fix.push_str(&format!("Valid keys: {}.", valid.join(", ")));
        self.err(span, message, fix)
    }

    fn bad_port(&self, span: &Span) -> ConfigError {
        self.err(
            span,
            format!(
                "redirect_ports entry {} is not valid: a port is a whole number from 1 to 65535.",
                self.snippet(span)
            ),
            "Write redirect_ports = [8400, 8401], or leave redirect_ports out to use a free port \
             chosen at each sign-in.",
        )
    }

    fn bad_secs(&self, path: &str, zero: bool) -> ConfigError {
        let (_, _, key, _) = parts(path);
        let (min, zero_fix) = secs_rule(key).unwrap_or_default();
        let fix = zero_fix.filter(|_| zero).map(str::to_owned);
        self.at(
            path,
            &format!("{{at}} is not valid: it must be between {min} and {MAX_SECS}."),
            fix.unwrap_or_else(|| format!("Write {key} = {}.", example(key))),
        )
    }

    /// Each duration the file gives: from its least value ([`secs_rule`]) to [`MAX_SECS`]. Serde has
    /// already refused what is not a whole number of at least 0.
    fn secs(&self) -> Checked {
        for table in ["provider", "session"] {
            let keys = self.item(table).and_then(Item::as_table_like);
            for (key, value) in keys.into_iter().flat_map(|t| t.iter()) {
                let n = value.as_integer().and_then(|n| u64::try_from(n).ok());
                let (Some((min, _)), Some(n)) = (secs_rule(key), n) else {
                    continue;
                };
                if !(min..=MAX_SECS).contains(&n) {
                    return Err(self.bad_secs(&join_path(table, key), n == 0));
                }
            }
        }
        Ok(())
    }

    /// The entries of a list of words: one word each.
    fn words(&self, path: &str, list: &[String]) -> Checked {
        for (i, s) in list.iter().enumerate() {
            let bad = s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control());
            let (_, _, key, _) = parts(path);
            self.rule(
                bad,
                &format!("{path}.{i}"),
                &format!(
                    "{key} entry {{shown}} is not valid: each entry is one word, with no spaces."
                ),
                format!(
                    "Write each as its own entry, e.g. {key} = {}.",
                    example(key)
                ),
            )?;
        }
        Ok(())
    }

    /// An http(s) address, checked by the rule the relay's reader uses too. `what` names the other
    /// end ("the provider", "the relay").
    fn url(&self, path: &str, value: &str, what: &str, allow_query: bool) -> Checked {
        let (_, _, key, _) = parts(path);
        let example = format!("{key} = {}", example(key));
        let (message, fix) = match check_http_url(value, allow_query) {
            Ok(()) => return Ok(()),
            Err(UrlProblem::NotUrl(why)) => (
                format!("{{at}} is not a valid URL ({why})."),
                format!("Write {example}."),
            ),
            Err(UrlProblem::PlainHttpToAnotherComputer) => (
                "{at} uses plain http to another computer.".to_owned(),
                format!(
                    "Use https://, e.g. {example}; plain http is allowed only when {what} runs \
                     on this computer, e.g. http://127.0.0.1:8080/ or http://[::1]:8080/."
                ),
            ),
            Err(problem) => (
                format!("{{at}} is not valid: {problem}."),
                format!("Write {example}."),
            ),
        };
        Err(self.at(path, &message, fix))
    }

    /// A path from the file, resolved (`~/` is the home folder; a relative path is read from the
    /// config file's folder); when `must_exist`, checked to be a file.
    fn file(
        &self,
        path: &str,
        raw: Option<PathBuf>,
        must_exist: bool,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let (_, _, key, _) = parts(path);
        let (what, example) = (file_what(key), example(key));
        let text = raw.to_string_lossy();
        self.rule(
            text.trim().is_empty(),
            path,
            "{at} is not valid: it is empty.",
            format!("Write the path of {what}, e.g. {key} = {example}, or leave {key} out."),
        )?;
        let rest = text.strip_prefix("~/").or_else(|| text.strip_prefix("~\\"));
        let file = match (text == "~", rest, home_dir(&env_var, Os::CURRENT)) {
            (true, _, Some(h)) => h,
            (_, Some(rest), Some(h)) => h.join(rest),
            _ => self.base.join(&raw),
        };
        self.rule(
            must_exist && self.check_files && !file.is_file(),
            path,
            &format!(
                "{{at}} names a file that does not exist or is not a file: {}.",
                file.display()
            ),
            format!(
                "Write the path of {what} (a relative path is read from the config file's folder)."
            ),
        )?;
        Ok(Some(file))
    }
}

pub(super) fn parse_inner(
    text: &str,
    origin: &Path,
    check_files: bool,
) -> Result<Config, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc = ImDocument::parse(text)
        .map_err(|e| syntax_error(text, origin.to_path_buf(), e.message(), e.span()))?;
    let base = origin.parent().map(Path::to_path_buf).unwrap_or_default();
    let r = Reader {
        text,
        file: origin,
        doc,
        base,
        check_files,
    };
    r.refuse_secrets(r.doc.as_item(), "")?;
    let raw: RawFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| r.serde_error(&e))?;
    r.secs()?;
    let at_provider = r.span("provider");
    let pick = "environment = \"int\", environment = \"live\" or environment = \"custom\"";
    let provider = match (raw.environment, raw.provider) {
        (None | Some(Environment::Sandbox), None) => None,
        (None, Some(_)) => Err(r.err(
            &at_provider,
            "the file has a [provider] section but no environment, so it does not say which \
             provider this is.",
            format!("Add {pick} at the top of the file, before [provider]."),
        ))?,
        (Some(Environment::Sandbox), Some(_)) => Err(r.err(
            &at_provider,
            "environment = \"sandbox\" uses the agent's embedded test provider, so it takes no \
             [provider] section.",
            format!(
                "Remove the [provider] section, or set {pick} to sign in against a real provider."
            ),
        ))?,
        (Some(env), p) => Some(read_provider(&r, p, env)?),
    };
    let mut agent = raw.agent;
    agent.socket = r.file("agent.socket", agent.socket, false)?;
    agent.data_dir = r.file("agent.data_dir", agent.data_dir, false)?;
    let mut clients = raw.clients;
    for (i, client) in clients.iter_mut().enumerate() {
        read_client(&r, client, i)?;
    }
    Ok(Config {
        environment: raw.environment.unwrap_or(Environment::Sandbox),
        provider,
        agent,
        clients,
        session: raw.session,
        workstation: raw.workstation,
        source: Some(origin.to_path_buf()),
    })
}

/// Removes repeated entries, keeping the first.
fn dedup(list: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|s| seen.insert(s.clone()));
}

/// Checks `[provider]`'s values, then fills the preset and defaults and checks what needs what.
fn read_provider(
    r: &Reader<'_>,
    p: Option<ProviderConfig>,
    env: Environment,
) -> Result<ProviderConfig, ConfigError> {
    let Some(mut p) = p else {
        let fix = match env {
            Environment::Custom => format!(
                "Add a [provider] section with issuer = {ISSUER_EXAMPLE} and client_id = \"…\" \
                 (this service's client ID at that provider)."
            ),
            _ => format!(
                "Add a [provider] section with client_id = {CLIENT_ID_EXAMPLE} (the client ID NHS \
                 England registered for this service)."
            ),
        };
        let message =
            format!("environment = \"{env}\" needs a [provider] section, and the file has none.");
        return Err(r.err(&r.span("environment"), message, fix));
    };
    let given = |key: &str| r.item(&format!("provider.{key}")).is_some();
    if given("issuer") {
        r.url("provider.issuer", &p.issuer, "the provider", false)?;
    }
    let word = !p.client_id.is_empty() && !p.client_id.contains(char::is_whitespace);
    r.rule(
        given("client_id") && !word,
        "provider.client_id",
        "{at} is not valid: it must be the client ID the provider registered, with no spaces.",
        format!("Write client_id = {CLIENT_ID_EXAMPLE}."),
    )?;
    r.words("provider.scopes", &p.scopes)?;
    let scopes: String = p.scopes.iter().map(|s| format!(", \"{s}\"")).collect();
    r.rule(
        !p.scopes.iter().any(|s| s == "openid"),
        "provider.scopes",
        "scopes = {shown} does not include \"openid\".",
        format!("OpenID Connect needs it: write scopes = [\"openid\"{scopes}]."),
    )?;
    r.rule(
        p.acr_values.iter().any(|s| s.contains(char::is_control)),
        "provider.acr_values",
        "acr_values is not valid: it contains control characters.",
        "Write acr_values = \"AAL2_OR_AAL3_ANY\" (or \"AAL3_ANY\" for smartcard-grade sign-in only).",
    )?;
    let prompt: Vec<&str> = p.prompt.iter().flat_map(|s| s.split_whitespace()).collect();
    r.rule(
        prompt.iter().any(|w| !PROMPT_VALUES.contains(w))
            || (prompt.contains(&"none") && prompt.len() > 1),
        "provider.prompt",
        "prompt = {shown} is not valid.",
        "Write prompt = \"login\" (CIS2 role selection needs it), prompt = \"consent\", prompt = \
         \"select_account\", prompt = \"none\", or prompt = \"\" to send no prompt.",
    )?;
    for (i, port) in p.redirect_ports.iter().enumerate() {
        let path = format!("provider.redirect_ports.{i}");
        if *port == 0 {
            return Err(r.bad_port(&r.span(&path)));
        }
        let twice = format!("redirect_ports lists port {port} twice.");
        let again = p.redirect_ports[..i].contains(port);
        r.rule(again, &path, &twice, "List each port once.")?;
    }
    read_exchange_values(r, &p.exchange)?;
    if !given("issuer") {
        let Some(preset) = env.preset_issuer() else {
            return Err(r.err(
                &r.span("provider"),
                format!("[provider] has no issuer, and environment = \"{env}\" needs one."),
                format!(
                    "Add issuer = {ISSUER_EXAMPLE} (the provider's issuer exactly as its discovery \
                     document gives it), or use environment = \"int\" or environment = \"live\" \
                     for NHS CIS2."
                ),
            ));
        };
        p.issuer = preset.to_owned();
    }
    if !given("client_id") {
        return Err(r.err(
            &r.span("provider"),
            format!("[provider] has no client_id, and environment = \"{env}\" needs one."),
            format!(
                "Add client_id = {CLIENT_ID_EXAMPLE} (the client ID registered for this service) \
                 to [provider]."
            ),
        ));
    }
    dedup(&mut p.scopes);
    p.acr_values = p.acr_values.map(|acr| acr.trim().to_owned());
    p.acr_values = p.acr_values.filter(|acr| !acr.is_empty());
    p.prompt = Some(prompt.join(" ")).filter(|s| !s.is_empty());
    p.ca_file = r.file("provider.ca_file", p.ca_file, true)?;
    read_exchange(r, &mut p.exchange, env)?;
    read_audiences(r, &mut p.audiences, p.exchange.method)?;
    Ok(p)
}

/// The values of `[provider.exchange]` that need no other key.
fn read_exchange_values(r: &Reader<'_>, x: &Exchange) -> Checked {
    if let Some(relay_url) = &x.relay_url {
        r.url("provider.exchange.relay_url", relay_url, "the relay", true)?;
    }
    r.rule(
        x.kid
            .as_deref()
            .is_some_and(|kid| cis2_jose::check_kid(kid).is_err()),
        "provider.exchange.kid",
        "kid = {shown} is not a key id this agent can send.",
        "Write the kid registered with CIS2 for this key, 1 to 128 letters, digits, - or _ \
         (e.g. kid = \"eps-cpt-ui-int\"), or leave kid out to send the key's RFC 7638 thumbprint.",
    )?;
    let is_name = |s: &str| {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    // The value is not quoted back: it may be the secret itself.
    r.rule(
        x.secret_env.as_deref().is_some_and(|s| !is_name(s)),
        "provider.exchange.secret_env",
        "secret_env is not the name of an environment variable (letters, digits and _, not \
         starting with a digit).",
        "secret_env names the variable that holds the secret, never the secret itself: write \
         secret_env = \"CIS2_CLIENT_SECRET\" and set that variable in the agent's environment.",
    )
}

/// The method (the environment's default when the file names none) and the key it needs.
fn read_exchange(r: &Reader<'_>, x: &mut Exchange, env: Environment) -> Checked {
    let default_method = match env {
        Environment::Int | Environment::Live => ExchangeMethod::Relay,
        Environment::Sandbox | Environment::Custom => ExchangeMethod::None,
    };
    if r.item("provider.exchange").is_none() && default_method == ExchangeMethod::Relay {
        return Err(r.err(
            &r.span("provider"),
            format!(
                "environment = \"{env}\" swaps the sign-in code for tokens through a relay by \
                 default, and there is no [provider.exchange] section with its relay_url."
            ),
            format!(
                "Add a [provider.exchange] section with method = \"relay\" and relay_url = \
                 {RELAY_EXAMPLE}, or choose another method there: method = \"private_key_jwt\", \
                 method = \"client_secret_post\" or method = \"none\"."
            ),
        ));
    }
    let stated = match r.item("provider.exchange.method") {
        Some(_) => format!("method = \"{}\"", x.method),
        None => {
            x.method = default_method;
            format!(
                "[provider.exchange] has no method, so it is \"{default_method}\" (the default for \
                 environment = \"{env}\"), which"
            )
        }
    };
    let must_exist = x.method == ExchangeMethod::PrivateKeyJwt;
    x.key_file = r.file("provider.exchange.key_file", x.key_file.take(), must_exist)?;
    let (key, add) = match x.method {
        ExchangeMethod::Relay if x.relay_url.is_none() => (
            "relay_url",
            format!("relay_url = {RELAY_EXAMPLE} (the address of your organisation's cis2-relay)"),
        ),
        ExchangeMethod::PrivateKeyJwt if x.key_file.is_none() => (
            "key_file",
            format!("key_file = \"client-key.pem\" ({})", file_what("key_file")),
        ),
        ExchangeMethod::ClientSecretPost if x.secret_env.is_none() => (
            "secret_env",
            "secret_env = \"CIS2_CLIENT_SECRET\" (the name of the environment variable holding \
             the client secret; the secret itself never goes in the file)"
                .to_owned(),
        ),
        _ => return Ok(()),
    };
    let others = ExchangeMethod::NAMES
        .iter()
        .filter(|n| **n != x.method.as_str());
    let others: Vec<String> = others.map(|n| format!("method = \"{n}\"")).collect();
    let method_span = r
        .span("provider.exchange.method")
        .or_else(|| r.span("provider.exchange"));
    Err(r.err(
        &method_span,
        format!("{stated} needs {key} in [provider.exchange], and there is none."),
        format!(
            "Add {add} to [provider.exchange], or choose another method: {}.",
            join_or(&others)
        ),
    ))
}

/// `[[provider.audiences]]`: named, one word each, once each, through the relay.
fn read_audiences(r: &Reader<'_>, list: &mut [AudienceRoute], method: ExchangeMethod) -> Checked {
    for i in 0..list.len() {
        let at = r.span(&format!("provider.audiences.{i}.name"));
        if at.is_none() {
            return Err(r.err(
                &r.span("provider.audiences"),
                "A [[provider.audiences]] entry has no name.",
                "Write name = \"apim\" (what programs ask for) in each [[provider.audiences]] entry.",
            ));
        }
        let audience = &list[i];
        for (key, value) in [("name", &audience.name), ("route", &audience.route)] {
            let path = format!("provider.audiences.{i}.{key}");
            let word = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
            r.rule(
                r.item(&path).is_some() && (value.is_empty() || !value.bytes().all(word)),
                &path,
                "[[provider.audiences]] {at} is not valid: it must be letters, digits, - _ or .",
                format!("Write {key} = \"apim\"."),
            )?;
        }
        let name = audience.name.clone();
        if method != ExchangeMethod::Relay {
            return Err(r.err(
                &at,
                format!(
                    "[[provider.audiences]] {name:?} needs the relay: API Platform tokens are \
                     exchanged by cis2-relay, which holds the platform key, and \
                     [provider.exchange] method is \"{method}\"."
                ),
                "Set [provider.exchange] method = \"relay\" with relay_url, or remove the \
                 [[provider.audiences]] entry.",
            ));
        }
        if list[..i].iter().any(|a| a.name == name) {
            let message = format!("[[provider.audiences]] name {name:?} is given twice.");
            let fix = "Give each [[provider.audiences]] entry its own name.";
            return Err(r.err(&at, message, fix));
        }
        if list[i].route.is_empty() {
            list[i].route = name;
        }
    }
    Ok(())
}

fn read_client(r: &Reader<'_>, c: &mut ClientRule, i: usize) -> Checked {
    let label = format!("[[clients]] entry {}", i + 1);
    let key = |key: &str| format!("clients.{i}.{key}");
    let entry_span = r.span(&format!("clients.{i}"));
    if r.item(&key("name")).is_none() {
        return Err(r.err(
            &entry_span,
            format!("{label} has no name."),
            "Add name = \"Ward EHR\" (the name shown to people when this program uses the agent).",
        ));
    }
    c.name = c.name.trim().to_owned();
    for hash in [&mut c.sha256, &mut c.script_sha256].into_iter().flatten() {
        *hash = hash.trim().to_ascii_lowercase();
    }
    r.rule(
        c.name.is_empty() || c.name.contains(char::is_control),
        &key("name"),
        "{at} is not valid: it is empty.",
        "Write name = \"Ward EHR\" (the name shown to people).",
    )?;
    for (k, what, value) in [
        ("path", "the program's executable", &c.path),
        ("script", "the script the interpreter runs", &c.script),
    ] {
        r.rule(
            value.as_ref().is_some_and(|p| !p.is_absolute()),
            &key(k),
            &format!("{{at}} is not valid: it must be the full path of {what}."),
            format!("Write {k} = {} (the absolute path).", example(k)),
        )?;
    }
    for (k, what, value) in [
        ("sha256", "executable", &c.sha256),
        ("script_sha256", "script", &c.script_sha256),
    ] {
        let hex = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
        r.rule(
            value.as_deref().is_some_and(|s| !hex(s)),
            &key(k),
            &format!(
                "{{at}} is not valid: it must be the {what}'s SHA-256 as 64 hexadecimal digits."
            ),
            format!(
                "Write {k} = {SHA_EXAMPLE} as printed by `sha256sum FILE` (Linux), `shasum -a \
                 256 FILE` (macOS) or `certutil -hashfile FILE SHA256` (Windows)."
            ),
        )?;
    }
    for (j, method) in c.methods.iter().flatten().enumerate() {
        let near = suggest(method, CLIENT_METHODS).map(|n| format!("Did you mean \"{n}\"? "));
        let valid = CLIENT_METHODS.join(", ");
        r.rule(
            !CLIENT_METHODS.contains(&method.as_str()),
            &key(&format!("methods.{j}")),
            "methods entry {shown}{in} is not a method of the agent.",
            format!("{}Valid methods: {valid}.", near.unwrap_or_default()),
        )?;
    }
    r.words(&key("audiences"), &c.audiences)?;
    r.words(&key("scopes"), &c.scopes)?;
    if c.path.is_none() && c.sha256.is_none() {
        return Err(r.err(
            &entry_span,
            format!("{label} (\"{}\") has neither path nor sha256, so no program can match it.", c.name),
            format!("Add path = {PATH_EXAMPLE} (the executable) and/or sha256 = {SHA_EXAMPLE} (its SHA-256)."),
        ));
    }
    let native = c
        .path
        .as_deref()
        .filter(|p| !crate::peer::is_interpreter(p));
    if let Some(exe) = native.filter(|_| c.script.is_some() || c.script_sha256.is_some()) {
        return Err(r.err(
            &entry_span,
            format!(
                "{label} (\"{}\") names a script, but {} is not an interpreter this agent knows \
                 (python, node, java, ruby, perl, php, dotnet, a shell…): a native program is \
                 never matched by its command line.",
                c.name,
                exe.display()
            ),
            "Remove script and script_sha256, or set path to the interpreter that runs the script.",
        ));
    }
    c.methods.iter_mut().for_each(dedup);
    dedup(&mut c.audiences);
    dedup(&mut c.scopes);
    Ok(())
}
