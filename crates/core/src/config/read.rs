//! Reading the file. serde reads it into the public types (each table `deny_unknown_fields`, so
//! the valid keys are its fields), and a serde error (unknown key, wrong type, unknown choice) is
//! turned here into our sentence on its line. The `toml_edit` document is walked once beside it
//! for what serde cannot see: a secret under any key, even an unknown one; where each key, value
//! and table is; and the value as written, which our rules check (by the key's dotted path) before
//! serde reads it, so that every mistake is reported on its own line.

use std::ops::Range;
use std::path::{Path, PathBuf};

use cis2_config_error::{line_of, suggest, syntax_error};
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::paths::{Os, env_var, home_dir};
use super::*;

type Span = Option<Range<usize>>;

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
/// The durations: the least value, and the fix for a 0 below it.
const SECS: [(&str, u64, Option<&str>); 6] = [
    ("provider.max_age", 0, None),
    (
        "provider.login_timeout_secs",
        1,
        Some("A sign-in needs some time in the browser: write login_timeout_secs = 300."),
    ),
    ("session.refresh_margin_secs", 0, None),
    ("session.expiring_notice_secs", 0, None),
    (
        "session.inactivity_secs",
        1,
        Some(
            "To switch the inactivity timeout off, write inactivity_action = \"none\" instead; \
             otherwise write inactivity_secs = 900.",
        ),
    ),
    (
        "session.absolute_secs",
        1,
        Some("A session needs a maximum length: write absolute_secs = 43200 (12 hours)."),
    ),
];

/// What a key's value must be and an example of one (the default where there is one).
fn shape(path: &str) -> (&'static str, &'static str) {
    const TEXT: &str = "text in double quotes";
    const NUMBER: &str = "a whole number";
    const BOOL: &str = "true or false (without quotes)";
    const LIST: &str = "a list in square brackets";
    match path {
        "provider.issuer" => (TEXT, ISSUER_EXAMPLE),
        "provider.client_id" => (TEXT, CLIENT_ID_EXAMPLE),
        "provider.scopes" => (LIST, "[\"openid\", \"profile\"]"),
        "provider.acr_values" => (TEXT, "\"AAL2_OR_AAL3_ANY\""),
        "provider.max_age" | "provider.login_timeout_secs" => (NUMBER, "300"),
        "provider.prompt" => (TEXT, "\"login\""),
        "provider.ca_file" => (TEXT, "\"/etc/cis2-agent/extra-ca.pem\""),
        "provider.redirect_ports" => ("a list of port numbers", "[8400, 8401]"),
        "provider.audiences.name" | "provider.audiences.route" => (TEXT, "\"apim\""),
        "provider.exchange.relay_url" => (TEXT, RELAY_EXAMPLE),
        "provider.exchange.key_file" => (TEXT, "\"client-key.pem\""),
        "provider.exchange.kid" => (TEXT, "\"eps-cpt-ui-int\""),
        "provider.exchange.secret_env" => (TEXT, "\"CIS2_CLIENT_SECRET\""),
        "agent.socket" => (TEXT, "\"/run/user/1000/cis2-agent/agent.sock\""),
        "agent.data_dir" => (TEXT, "\"/var/lib/cis2-agent\""),
        "agent.audit_sync" | "workstation.allow_user_switch" => (BOOL, "false"),
        "workstation.same_card_unlocks" | "session.end_session_at_provider" => (BOOL, "true"),
        "clients.name" => (TEXT, "\"Ward EHR\""),
        "clients.path" => (TEXT, PATH_EXAMPLE),
        "clients.sha256" | "clients.script_sha256" => (TEXT, SHA_EXAMPLE),
        "clients.script" => (TEXT, "\"/opt/ehr/ehr.py\""),
        "clients.methods" => (LIST, "[\"status\", \"whoami\", \"token\"]"),
        "clients.audiences" => (LIST, "[\"https://ehr.example.nhs.uk\"]"),
        "clients.scopes" => (LIST, "[\"nhsperson\"]"),
        "session.refresh_margin_secs" => (NUMBER, "60"),
        "session.expiring_notice_secs" => (NUMBER, "120"),
        "session.inactivity_secs" => (NUMBER, "900"),
        "session.absolute_secs" => (NUMBER, "43200"),
        _ => (TEXT, "\"…\""),
    }
}

/// What the file named by a path key holds, for messages.
fn file_what(key: &str) -> Option<&'static str> {
    Some(match key {
        "ca_file" => "a PEM file of extra CA certificates",
        "key_file" => "the PEM file holding the client's RSA private key",
        "socket" => "the agent's socket",
        "data_dir" => "the agent's data folder",
        _ => return None,
    })
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

/// The keys a table takes, as its derived `Deserialize` names them: serde hands them to
/// `deserialize_struct`, and this deserializer only writes them down.
fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields noted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Each table's dotted path, how messages place it, and its keys: to list the valid keys and to
/// tell someone who put a key in the wrong table where it goes.
fn tables() -> [(&'static str, &'static str, &'static [&'static str]); 8] {
    let top = "at the top of the file, before the first [section] heading";
    [
        ("", top, keys_of::<RawFile>()),
        ("provider", "in [provider]", keys_of::<ProviderConfig>()),
        (
            "provider.exchange",
            "in [provider.exchange]",
            keys_of::<Exchange>(),
        ),
        ("agent", "in [agent]", keys_of::<AgentConfig>()),
        ("session", "in [session]", keys_of::<SessionConfig>()),
        (
            "workstation",
            "in [workstation]",
            keys_of::<WorkstationConfig>(),
        ),
        ("clients", "in a [[clients]] entry", keys_of::<ClientRule>()),
        (
            "provider.audiences",
            "in a [[provider.audiences]] entry",
            keys_of::<AudienceRoute>(),
        ),
    ]
}

/// One key of the document, wherever it is (unknown and inline tables included), in file order.
/// An entry of a list of tables is recorded too, under the key `""`, at its header.
struct KeyAt<'d> {
    /// Dotted path of the table holding it: `""`, `provider.exchange`, `clients`.
    table: String,
    /// Which entry, when the table is an entry of a list of tables.
    entry: Option<usize>,
    key: &'d str,
    span: Span,
    value_span: Span,
    /// The value as written; `None` for a table or a list of tables.
    value: Option<&'d Value>,
    is_table: bool,
}

impl KeyAt<'_> {
    /// What was written, in the words of our messages.
    fn kind(&self) -> &'static str {
        match self.value {
            Some(Value::String(_)) => "text",
            Some(Value::Integer(_)) => "a whole number",
            Some(Value::Float(_)) => "a decimal number",
            Some(Value::Boolean(_)) => "true/false",
            Some(Value::Datetime(_)) => "a date or time",
            Some(Value::Array(_)) => "a list",
            None if !self.is_table => "a list",
            _ => "a table",
        }
    }
}

fn collect<'d>(t: &'d dyn TableLike, table: &str, entry: Option<usize>, out: &mut Vec<KeyAt<'d>>) {
    for (key, item) in t.iter() {
        let span = t.key(key).and_then(|k| k.span()).or_else(|| item.span());
        let is_table = matches!(item, Item::Table(_) | Item::ArrayOfTables(_));
        let (value_span, value) = (item.span(), item.as_value());
        out.push(KeyAt {
            table: table.to_owned(),
            entry,
            key,
            span,
            value_span,
            value,
            is_table,
        });
        let path = join_path(table, key);
        match item {
            Item::Table(t) => collect(t, &path, None, out),
            Item::ArrayOfTables(list) => {
                for (i, t) in list.iter().enumerate() {
                    collect_entry(t, t.span(), &path, i, out);
                }
            }
            Item::Value(v) => collect_value(v, &path, out),
            Item::None => {}
        }
    }
}

fn collect_entry<'d>(
    t: &'d dyn TableLike,
    span: Span,
    table: &str,
    i: usize,
    out: &mut Vec<KeyAt<'d>>,
) {
    let (value_span, value, is_table) = (span.clone(), None, true);
    out.push(KeyAt {
        table: table.to_owned(),
        entry: Some(i),
        key: "",
        span,
        value_span,
        value,
        is_table,
    });
    collect(t, table, Some(i), out);
}

fn collect_value<'d>(v: &'d Value, path: &str, out: &mut Vec<KeyAt<'d>>) {
    match v {
        Value::InlineTable(t) => collect(t, path, None, out),
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                match v {
                    Value::InlineTable(t) => collect_entry(t, v.span(), path, i, out),
                    v => collect_value(v, path, out),
                }
            }
        }
        _ => {}
    }
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// How a key is shown in lists and suggestions: tables as `[provider]`, the clients list as
/// `[[clients]]`, plain keys bare.
fn display_entry(parent: &str, key: &str) -> String {
    let path = join_path(parent, key);
    match path.as_str() {
        "clients" => format!("[[{path}]]"),
        "provider" | "provider.exchange" | "agent" | "session" | "workstation" => {
            format!("[{path}]")
        }
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

struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    base: PathBuf,
    check_files: bool,
    keys: Vec<KeyAt<'a>>,
}

impl Ctx<'_> {
    fn err(&self, span: &Span, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        let (file, message, fix) = (self.file.to_path_buf(), message.into(), fix.into());
        let line = span.as_ref().map(|s| line_of(self.text, s.start));
        ConfigError {
            file,
            line,
            message,
            fix,
        }
    }

    /// The source text of a value, for quoting it back: first line only, at most 60 characters.
    fn snippet(&self, span: &Span) -> String {
        let raw = span
            .as_ref()
            .and_then(|r| self.text.get(r.clone()))
            .unwrap_or("")
            .trim();
        let first = raw.lines().next().unwrap_or("").trim_end();
        let short: String = first.chars().take(60).collect();
        if short.len() < raw.len() {
            format!("{short}…")
        } else {
            short
        }
    }

    /// The key `key` of table `table` (entry `entry` of a list of tables), if the file gives it.
    fn find(&self, table: &str, entry: Option<usize>, key: &str) -> Option<&KeyAt<'_>> {
        self.keys
            .iter()
            .find(|k| k.table == table && k.entry == entry && k.key == key)
    }

    /// Where a table (or an entry of `[[clients]]`) starts: its header, else its first key.
    fn table_span(&self, table: &str, entry: Option<usize>) -> Span {
        let (parent, key) = match (entry, table.rsplit_once('.')) {
            (Some(_), _) => (table, ""),
            (None, Some((parent, key))) => (parent, key),
            (None, None) => ("", table),
        };
        let header = self.find(parent, entry, key).filter(|k| k.span.is_some());
        let first = || {
            self.keys
                .iter()
                .find(|k| k.table == table && k.entry == entry)
        };
        header.or_else(first).and_then(|k| k.span.clone())
    }

    /// A path from the file: `~/` is the home folder; relative paths are read from the config
    /// file's folder.
    fn resolve(&self, raw: &Path) -> PathBuf {
        let text = raw.to_string_lossy();
        let rest = text.strip_prefix("~/").or_else(|| text.strip_prefix("~\\"));
        match (text == "~", rest, home_dir(&env_var, Os::CURRENT)) {
            (true, _, Some(h)) => h,
            (_, Some(rest), Some(h)) => h.join(rest),
            _ => self.base.join(raw),
        }
    }

    /// A serde error as our sentence: an unknown key or table (with the nearest valid one or the
    /// table it belongs in), or a value of the wrong type or not among the choices.
    fn serde_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let named = |k: &&KeyAt| !k.key.is_empty();
        let exact = self
            .keys
            .iter()
            .filter(named)
            .find(|k| k.span == span || k.value_span == span);
        let inside = |k: &&KeyAt| match (&k.value_span, &span) {
            (Some(v), Some(s)) => v.start <= s.start && s.end <= v.end,
            _ => false,
        };
        let Some(at) = exact.or_else(|| self.keys.iter().filter(named).rfind(inside)) else {
            let message = e.message().trim().trim_end_matches('.');
            let fix = "Check the TOML on that line against docs/configuration.md.";
            return self.err(&span, format!("{message}."), fix);
        };
        let (key, path, shown, found) = (
            at.key,
            join_path(&at.table, at.key),
            self.snippet(&span),
            at.kind(),
        );
        let (wanted, example) = shape(&path);
        if e.message().starts_with("unknown field") {
            self.unknown_key(at)
        } else if at.value_span != span {
            let message = format!("{key} contains {shown}, which is not text in double quotes.");
            self.err(
                &span,
                message,
                format!("Write each entry in double quotes, e.g. {key} = {example}."),
            )
        } else if path == "clients" {
            self.err(
                &span,
                format!(
                    "clients = {shown} is not valid: clients must be a list of [[clients]] \
                     sections, not {found}."
                ),
                "Write each program as its own section: a line [[clients]], then name = \"Ward \
                 EHR\" \
                 and path = \"/opt/ehr/bin/ehr\" on the lines below.",
            )
        } else if display_entry(&at.table, key).starts_with('[') {
            let message =
                format!("{key} = {shown} is not valid: {key} must be a table, not {found}.");
            self.err(
                &span,
                message,
                format!("Write it as a section: a line [{path}] followed by its keys."),
            )
        } else if let Some(names) = choices(key) {
            let near = at
                .value
                .and_then(Value::as_str)
                .and_then(|s| suggest(s, names.iter().copied()));
            let near = near
                .map(|n| format!("Did you mean \"{n}\"? "))
                .unwrap_or_default();
            let options: Vec<String> = names.iter().map(|n| format!("{key} = \"{n}\"")).collect();
            let fix = format!("{near}Write {}.", join_or(&options));
            self.err(&span, format!("{key} = {shown} is not valid."), fix)
        } else {
            let message =
                format!("{key} = {shown} is not valid: {key} must be {wanted}, not {found}.");
            self.err(&span, message, format!("Write {key} = {example}."))
        }
    }

    fn unknown_key(&self, at: &KeyAt) -> ConfigError {
        let (path, key, tables) = (join_path(&at.table, at.key), at.key, tables());
        let own = tables.iter().find(|(t, _, _)| *t == at.table);
        let allowed = own.map(|(_, _, keys)| *keys).unwrap_or_default();
        let message = match (at.is_table, at.table.as_str(), at.entry) {
            (true, _, Some(_)) => format!("unknown table [[{path}]]."),
            (true, _, None) => format!("unknown table [{path}]."),
            (false, "", _) => format!("unknown key \"{key}\" at the top level."),
            (false, table, Some(i)) => {
                format!("unknown key \"{key}\" in [[{table}]] entry {}.", i + 1)
            }
            (false, table, None) => format!("unknown key \"{key}\" in [{table}]."),
        };
        let mut fix = String::new();
        if let Some(near) = suggest(key, allowed.iter().copied()) {
            let shown = display_entry(&at.table, near);
            let shown = if shown.starts_with('[') {
                shown
            } else {
                format!("\"{shown}\"")
            };
            fix = format!("Did you mean {shown}? ");
        } else if let Some((_, home, _)) = tables.iter().find(|(_, _, k)| k.contains(&key)) {
            fix = format!("\"{key}\" belongs {home}: move it there. ");
        }
        let valid: Vec<String> = allowed
            .iter()
            .map(|k| display_entry(&at.table, k))
            .collect();
        fix.push_str(&format!("Valid keys: {}.", valid.join(", ")));
        self.err(&at.span, message, fix)
    }

    /// Our rules for one value as the file writes it, by the key's dotted path. A value of the
    /// wrong type is left to serde, which names the type.
    fn check_value(&self, k: &KeyAt) -> Result<(), ConfigError> {
        let (Some(v), key, path) = (k.value, k.key, join_path(&k.table, k.key)) else {
            return Ok(());
        };
        let (span, example) = (v.span(), shape(&path).1);
        let shown = self.snippet(&span);
        let label = match k.entry {
            Some(i) if k.table == "clients" => format!(" in [[clients]] entry {}", i + 1),
            _ => String::new(),
        };
        let invalid = |reason: &str, fix: String| {
            Err(self.err(
                &span,
                format!("{key} = {shown}{label} is not valid: {reason}."),
                fix,
            ))
        };
        if let (Some((_, min, zero_fix)), Some(n)) =
            (SECS.iter().find(|s| s.0 == path), v.as_integer())
        {
            if u64::try_from(n).is_ok_and(|n| (*min..=MAX_SECS).contains(&n)) {
                return Ok(());
            }
            let fix = zero_fix
                .filter(|_| n == 0)
                .map_or(format!("Write {key} = {example}."), str::to_owned);
            return invalid(&format!("it must be between {min} and {MAX_SECS}"), fix);
        }
        if let Some(list) = v.as_array() {
            return self.check_list(&path, key, &label, list);
        }
        let Some(s) = v.as_str() else { return Ok(()) };
        let word =
            |s: &str| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c.is_control());
        let is_name = |s: &str| {
            let mut chars = s.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let prompt = s.split_whitespace().collect::<Vec<_>>();
        let bad_prompt = prompt.iter().any(|w| !PROMPT_VALUES.contains(w))
            || (prompt.contains(&"none") && prompt.len() > 1);
        let hex = s.trim().len() == 64 && s.trim().chars().all(|c| c.is_ascii_hexdigit());
        let is_path = key == "path";
        let audience = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        match path.as_str() {
            "provider.issuer" => check_url(self, key, s, &span, (example, "the provider"), false),
            "provider.exchange.relay_url" => {
                check_url(self, key, s, &span, (example, "the relay"), true)
            }
            "provider.client_id" if !word(s) => invalid(
                "it must be the client ID the provider registered, with no spaces",
                format!("Write client_id = {example}."),
            ),
            "provider.acr_values" if s.contains(char::is_control) => Err(self.err(
                &span,
                "acr_values is not valid: it contains control characters.",
                "Write acr_values = \"AAL2_OR_AAL3_ANY\" (or \"AAL3_ANY\" for smartcard-grade \
                 sign-in only).",
            )),
            "provider.prompt" if bad_prompt => Err(self.err(
                &span,
                format!("prompt = {shown} is not valid."),
                "Write prompt = \"login\" (CIS2 role selection needs it), prompt = \"consent\", \
                 prompt = \"select_account\", prompt = \"none\", or prompt = \"\" to send no \
                 prompt.",
            )),
            "provider.ca_file"
            | "provider.exchange.key_file"
            | "agent.socket"
            | "agent.data_dir"
                if s.trim().is_empty() =>
            {
                let what = file_what(key).unwrap_or_default();
                let fix = format!(
                    "Write the path of {what}, e.g. {key} = {example}, or leave {key} out."
                );
                invalid("it is empty", fix)
            }
            "provider.exchange.kid" if cis2_jose::check_kid(s).is_err() => Err(self.err(
                &span,
                format!("kid = {shown} is not a key id this agent can send."),
                "Write the kid registered with CIS2 for this key, 1 to 128 letters, digits, - or _ \
                 (e.g. kid = \"eps-cpt-ui-int\"), or leave kid out to send the key's RFC 7638 \
                 thumbprint.",
            )),
            // The value is not quoted back: it may be the secret itself.
            "provider.exchange.secret_env" if !is_name(s) => Err(self.err(
                &span,
                "secret_env is not the name of an environment variable (letters, digits and _, not \
                 starting with a digit).",
                "secret_env names the variable that holds the secret, never the secret itself: \
                 write secret_env = \"CIS2_CLIENT_SECRET\" and set that variable in the agent's \
                 environment.",
            )),
            "provider.audiences.name" | "provider.audiences.route" if !audience => Err(self.err(
                &span,
                format!(
                    "[[provider.audiences]] {key} = {shown} is not valid: it must be letters, \
                     digits, - _ or ."
                ),
                format!("Write {key} = \"apim\"."),
            )),
            "clients.name" if s.trim().is_empty() || s.trim().contains(char::is_control) => {
                invalid(
                    "it is empty",
                    "Write name = \"Ward EHR\" (the name shown to people).".into(),
                )
            }
            "clients.path" | "clients.script" if !Path::new(s).is_absolute() => {
                let what = match is_path {
                    true => "the program's executable",
                    false => "the script the interpreter runs",
                };
                let fix = format!("Write {key} = {example} (the absolute path).");
                invalid(&format!("it must be the full path of {what}"), fix)
            }
            "clients.sha256" | "clients.script_sha256" if !hex => {
                let what = if key == "sha256" {
                    "executable"
                } else {
                    "script"
                };
                invalid(
                    &format!("it must be the {what}'s SHA-256 as 64 hexadecimal digits"),
                    format!(
                        "Write {key} = {SHA_EXAMPLE} as printed by `sha256sum FILE` (Linux), \
                         `shasum -a 256 FILE` (macOS) or `certutil -hashfile FILE SHA256` \
                         (Windows)."
                    ),
                )
            }
            _ => Ok(()),
        }
    }

    /// Our rules for the entries of a list; an entry of the wrong type is left to serde.
    fn check_list(
        &self,
        path: &str,
        key: &str,
        label: &str,
        list: &toml_edit::Array,
    ) -> Result<(), ConfigError> {
        let (span, example) = (list.span(), shape(path).1);
        let mut seen = Vec::new();
        for v in list {
            let (at, shown) = (v.span(), self.snippet(&v.span()));
            if path == "provider.redirect_ports" {
                let port = v
                    .as_integer()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0);
                if port.is_some_and(|p| seen.contains(&p.to_string())) {
                    let n = port.unwrap_or_default();
                    return Err(self.err(
                        &at,
                        format!("redirect_ports lists port {n} twice."),
                        "List each port once.",
                    ));
                }
                let Some(port) = port else {
                    return Err(self.err(
                        &at,
                        format!(
                            "redirect_ports entry {shown} is not valid: a port is a whole \
                                 number from 1 to 65535."
                        ),
                        format!(
                            "Write redirect_ports = {example}, or leave redirect_ports out to use \
                             a free port \
                             chosen at each sign-in."
                        ),
                    ));
                };
                seen.push(port.to_string());
                continue;
            }
            let Some(s) = v.as_str() else { return Ok(()) };
            if path == "clients.methods" && !CLIENT_METHODS.contains(&s) {
                let near = suggest(s, CLIENT_METHODS).map(|n| format!("Did you mean \"{n}\"? "));
                return Err(self.err(
                    &at,
                    format!("methods entry {shown}{label} is not a method of the agent."),
                    format!(
                        "{}Valid methods: {}.",
                        near.unwrap_or_default(),
                        CLIENT_METHODS.join(", ")
                    ),
                ));
            }
            if path != "clients.methods"
                && (s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control()))
            {
                return Err(self.err(
                    &at,
                    format!(
                        "{key} entry {shown} is not valid: each entry is one word, with no spaces."
                    ),
                    format!("Write each as its own entry, e.g. {key} = {example}."),
                ));
            }
            seen.push(s.to_owned());
        }
        if path == "provider.scopes" && !seen.iter().any(|s| s == "openid") {
            let listed: Vec<String> = seen.iter().map(|s| format!(", \"{s}\"")).collect();
            return Err(self.err(
                &span,
                format!(
                    "scopes = {} does not include \"openid\".",
                    self.snippet(&span)
                ),
                format!(
                    "OpenID Connect needs it: write scopes = [\"openid\"{}].",
                    listed.concat()
                ),
            ));
        }
        Ok(())
    }

    /// A path from the file, resolved; when `must_exist`, checked to be a file.
    fn file(
        &self,
        table: &str,
        key: &str,
        raw: Option<PathBuf>,
        must_exist: bool,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = raw.map(|raw| self.resolve(&raw)) else {
            return Ok(None);
        };
        if must_exist && self.check_files && !path.is_file() {
            let span = self
                .find(table, None, key)
                .and_then(|k| k.value_span.clone());
            return Err(self.err(
                &span,
                format!(
                    "{key} = {} names a file that does not exist or is not a file: {}.",
                    self.snippet(&span),
                    path.display()
                ),
                format!(
                    "Write the path of {} (a relative path is read from the config file's folder).",
                    file_what(key).unwrap_or_default()
                ),
            ));
        }
        Ok(Some(path))
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Checks an http(s) URL without changing it: `https://`, or `http://` to this computer only.
/// `what` names the other end ("the provider", "the relay").
fn check_url(
    ctx: &Ctx<'_>,
    key: &str,
    value: &str,
    span: &Span,
    (example, what): (&str, &str),
    allow_query: bool,
) -> Result<(), ConfigError> {
    let (shown, fix) = (ctx.snippet(span), format!("Write {key} = {example}."));
    let invalid = |reason: &str| {
        Err(ctx.err(
            span,
            format!("{key} = {shown} is not valid: {reason}."),
            &*fix,
        ))
    };
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("a URL has no spaces");
    }
    let url = url::Url::parse(value).map_err(|e| {
        ctx.err(
            span,
            format!("{key} = {shown} is not a valid URL ({e})."),
            &*fix,
        )
    })?;
    let lower = value.to_ascii_lowercase();
    let http = lower.starts_with("http://") && url.scheme() == "http";
    let https = lower.starts_with("https://") && url.scheme() == "https";
    if http && !is_loopback_host(&url) {
        return Err(ctx.err(
            span,
            format!("{key} = {shown} uses plain http to another computer."),
            format!(
                "Use https:// ({fix}); plain http is allowed only when {what} runs on this \
                 computer, e.g. \
                 http://127.0.0.1:8080/ or http://[::1]:8080/."
            ),
        ));
    }
    if !(http || https) {
        return invalid("it must start with https://");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return invalid("it has no host name");
    }
    if url.fragment().is_some() || (!allow_query && url.query().is_some()) {
        return invalid(if allow_query {
            "it must not have a #fragment"
        } else {
            "it must not have a ?query or #fragment"
        });
    }
    Ok(())
}

pub(super) fn parse_inner(
    text: &str,
    origin: &Path,
    check_files: bool,
) -> Result<Config, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc = ImDocument::parse(text)
        .map_err(|e| syntax_error(text, origin.to_path_buf(), e.message(), e.span()))?;
    let mut keys = Vec::new();
    collect(doc.as_table(), "", None, &mut keys);
    let base = origin.parent().map(Path::to_path_buf).unwrap_or_default();
    let ctx = Ctx {
        text,
        file: origin,
        base,
        check_files,
        keys,
    };

    let secret =
        |k: &&KeyAt| SECRET_KEYS.contains(&k.key.to_lowercase().replace('-', "_").as_str());
    if let Some(at) = ctx.keys.iter().find(secret) {
        let place = match at.table.as_str() {
            "" => "at the top level".to_owned(),
            "clients" => "in [[clients]]".to_owned(),
            table => format!("in [{table}]"),
        };
        return Err(ctx.err(
            &at.span,
            format!(
                "\"{}\" {place}: secrets never go in the config file.",
                at.key
            ),
            "Remove it, put the secret in an environment variable of the agent, and name that \
             variable \
             in [provider.exchange]: method = \"client_secret_post\" and secret_env = \
             \"CIS2_CLIENT_SECRET\".",
        ));
    }
    for k in &ctx.keys {
        ctx.check_value(k)?;
    }
    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.serde_error(&e))?;

    let provider_span = ctx.table_span("provider", None);
    let environment = match (raw.environment, &raw.provider) {
        (Some(env), _) => env,
        (None, None) => Environment::Sandbox,
        (None, Some(_)) => {
            return Err(ctx.err(
                &provider_span,
                "the file has a [provider] section but no environment, so it does not say which \
                 provider this is.",
                "Add environment = \"int\", environment = \"live\" or environment = \"custom\" at \
                 the \
                 top of the file, before [provider].",
            ));
        }
    };
    let provider = match (environment, raw.provider) {
        (Environment::Sandbox, Some(_)) => {
            return Err(ctx.err(
                &provider_span,
                "environment = \"sandbox\" uses the agent's embedded test provider, so it takes no \
                 [provider] section.",
                "Remove the [provider] section, or set environment = \"int\", environment = \
                 \"live\" or \
                 environment = \"custom\" to sign in against a real provider.",
            ));
        }
        (Environment::Sandbox, None) => None,
        (env, p) => Some(read_provider(&ctx, p, env)?),
    };

    let mut agent = raw.agent;
    agent.socket = ctx.file("agent", "socket", agent.socket, false)?;
    agent.data_dir = ctx.file("agent", "data_dir", agent.data_dir, false)?;
    let mut clients = raw.clients;
    for (i, client) in clients.iter_mut().enumerate() {
        read_client(&ctx, client, i)?;
    }
    let (session, workstation) = (raw.session, raw.workstation);
    let source = Some(origin.to_path_buf());
    Ok(Config {
        environment,
        provider,
        agent,
        clients,
        session,
        workstation,
        source,
    })
}

/// Removes repeated entries, keeping the first.
fn dedup(list: &mut Vec<String>) {
    let mut seen = Vec::new();
    list.retain(|s| {
        !seen.contains(s) && {
            seen.push(s.clone());
            true
        }
    });
}

fn read_provider(
    ctx: &Ctx<'_>,
    p: Option<ProviderConfig>,
    env: Environment,
) -> Result<ProviderConfig, ConfigError> {
    let name = env.as_str();
    let Some(mut p) = p else {
        let fix = if env == Environment::Custom {
            format!(
                "Add a [provider] section with issuer = {ISSUER_EXAMPLE} and client_id = \"…\" \
                 (this \
                 service's client ID at that provider)."
            )
        } else {
            format!(
                "Add a [provider] section with client_id = {CLIENT_ID_EXAMPLE} (the client ID NHS \
                 England \
                 registered for this service)."
            )
        };
        let span = ctx
            .find("", None, "environment")
            .and_then(|k| k.value_span.clone());
        return Err(ctx.err(
            &span,
            format!("environment = \"{name}\" needs a [provider] section, and the file has none."),
            fix,
        ));
    };
    let p_span = ctx.table_span("provider", None);
    let given = |key| ctx.find("provider", None, key).is_some();
    if !given("issuer") {
        let Some(preset) = env.preset_issuer() else {
            return Err(ctx.err(
                &p_span,
                format!("[provider] has no issuer, and environment = \"{name}\" needs one."),
                format!(
                    "Add issuer = {ISSUER_EXAMPLE} (the provider's issuer exactly as its \
                     discovery document \
                     gives it), or use environment = \"int\" or environment = \"live\" for NHS \
                     CIS2."
                ),
            ));
        };
        p.issuer = preset.to_owned();
    }
    if !given("client_id") {
        return Err(ctx.err(
            &p_span,
            format!("[provider] has no client_id, and environment = \"{name}\" needs one."),
            format!(
                "Add client_id = {CLIENT_ID_EXAMPLE} (the client ID registered for this \
                     service) to [provider]."
            ),
        ));
    }
    dedup(&mut p.scopes);
    p.acr_values = p
        .acr_values
        .map(|acr| acr.trim().to_owned())
        .filter(|acr| !acr.is_empty());
    p.prompt = p
        .prompt
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty());
    p.ca_file = ctx.file("provider", "ca_file", p.ca_file, true)?;
    read_exchange(ctx, &mut p.exchange, env, &p_span)?;
    let mut names = Vec::new();
    for (i, audience) in p.audiences.iter_mut().enumerate() {
        let Some(at) = ctx.find("provider.audiences", Some(i), "name") else {
            return Err(ctx.err(
                &ctx.table_span("provider.audiences", None),
                "A [[provider.audiences]] entry has no name.",
                "Write name = \"apim\" (what programs ask for) in each [[provider.audiences]] \
                 entry.",
            ));
        };
        let (name, method) = (&audience.name, p.exchange.method);
        if method != ExchangeMethod::Relay {
            return Err(ctx.err(
                &at.span,
                format!(
                    "[[provider.audiences]] {name:?} needs the relay: API Platform tokens are \
                     exchanged by \
                     cis2-relay, which holds the platform key, and [provider.exchange] method is \
                     \"{method}\"."
                ),
                "Set [provider.exchange] method = \"relay\" with relay_url, or remove the \
                 [[provider.audiences]] entry.",
            ));
        }
        if names.contains(name) {
            let message = format!("[[provider.audiences]] name {name:?} is given twice.");
            return Err(ctx.err(
                &at.span,
                message,
                "Give each [[provider.audiences]] entry its own name.",
            ));
        }
        names.push(name.clone());
        if audience.route.is_empty() {
            audience.route = name.clone();
        }
    }
    Ok(p)
}

fn read_exchange(
    ctx: &Ctx<'_>,
    x: &mut Exchange,
    env: Environment,
    provider_span: &Span,
) -> Result<(), ConfigError> {
    let default_method = match env {
        Environment::Int | Environment::Live => ExchangeMethod::Relay,
        Environment::Sandbox | Environment::Custom => ExchangeMethod::None,
    };
    if ctx.find("provider", None, "exchange").is_none() && default_method == ExchangeMethod::Relay {
        return Err(ctx.err(
            provider_span,
            format!(
                "environment = \"{env}\" swaps the sign-in code for tokens through a relay by \
                 default, and \
                 there is no [provider.exchange] section with its relay_url."
            ),
            format!(
                "Add a [provider.exchange] section with method = \"relay\" and relay_url = \
                 {RELAY_EXAMPLE}, \
                 or choose another method there: method = \"private_key_jwt\", method = \
                 \"client_secret_post\" or method = \"none\"."
            ),
        ));
    }
    let (method_span, stated) = match ctx.find("provider.exchange", None, "method") {
        Some(at) => (at.value_span.clone(), format!("method = \"{}\"", x.method)),
        None => {
            x.method = default_method;
            let stated = format!(
                "[provider.exchange] has no method, so it is \"{default_method}\" (the default for \
                 environment = \"{env}\"), which"
            );
            (ctx.table_span("provider.exchange", None), stated)
        }
    };
    let must_exist = x.method == ExchangeMethod::PrivateKeyJwt;
    x.key_file = ctx.file(
        "provider.exchange",
        "key_file",
        x.key_file.take(),
        must_exist,
    )?;
    let missing = match x.method {
        ExchangeMethod::Relay if x.relay_url.is_none() => Some((
            "relay_url",
            format!("relay_url = {RELAY_EXAMPLE} (the address of your organisation's cis2-relay)"),
        )),
        ExchangeMethod::PrivateKeyJwt if x.key_file.is_none() => {
            let what = file_what("key_file").unwrap_or_default();
            Some((
                "key_file",
                format!("key_file = \"client-key.pem\" ({what})"),
            ))
        }
        ExchangeMethod::ClientSecretPost if x.secret_env.is_none() => Some((
            "secret_env",
            "secret_env = \"CIS2_CLIENT_SECRET\" (the name of the environment variable holding \
             the client \
             secret; the secret itself never goes in the file)"
                .to_owned(),
        )),
        _ => None,
    };
    let Some((key, add)) = missing else {
        return Ok(());
    };
    let others = ExchangeMethod::NAMES
        .iter()
        .filter(|n| **n != x.method.as_str());
    let others: Vec<String> = others.map(|n| format!("method = \"{n}\"")).collect();
    Err(ctx.err(
        &method_span,
        format!("{stated} needs {key} in [provider.exchange], and there is none."),
        format!(
            "Add {add} to [provider.exchange], or choose another method: {}.",
            join_or(&others)
        ),
    ))
}

fn read_client(ctx: &Ctx<'_>, c: &mut ClientRule, i: usize) -> Result<(), ConfigError> {
    let label = format!("[[clients]] entry {}", i + 1);
    let entry_span = ctx.table_span("clients", Some(i));
    if ctx.find("clients", Some(i), "name").is_none() {
        return Err(ctx.err(
            &entry_span,
            format!("{label} has no name."),
            "Add name = \"Ward EHR\" (the name shown to people when this program uses the agent).",
        ));
    }
    c.name = c.name.trim().to_owned();
    for hash in [&mut c.sha256, &mut c.script_sha256].into_iter().flatten() {
        *hash = hash.trim().to_ascii_lowercase();
    }
    if c.path.is_none() && c.sha256.is_none() {
        return Err(ctx.err(
            &entry_span,
            format!(
                "{label} (\"{}\") has neither path nor sha256, so no program can match it.",
                c.name
            ),
            format!(
                "Add path = {PATH_EXAMPLE} (the executable) and/or sha256 = {SHA_EXAMPLE} \
                     (its SHA-256)."
            ),
        ));
    }
    if (c.script.is_some() || c.script_sha256.is_some())
        && let Some(exe) = c
            .path
            .as_deref()
            .filter(|p| !crate::peer::is_interpreter(p))
    {
        return Err(ctx.err(
            &entry_span,
            format!(
                "{label} (\"{}\") names a script, but {} is not an interpreter this agent knows \
                 (python, \
                 node, java, ruby, perl, php, dotnet, a shell…): a native program is never matched by its \
                 command line.",
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
