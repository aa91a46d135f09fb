//! Reading the file with serde. Each table is a `Raw*` struct with `deny_unknown_fields` (so the
//! valid keys are its fields) whose values carry their type and, where a rule needs it, their span
//! (`toml::Spanned`). A serde error (unknown key, wrong type, unknown choice) is turned here into
//! our sentence on its line; then our rules run on the typed values. The `toml_edit` document is
//! walked once beside it for what serde cannot see: a secret under any key, even an unknown one,
//! where a key or table is, and what kind of value was written.

use std::ops::Range;
use std::path::{Path, PathBuf};

use cis2_config_error::{line_of, suggest, syntax_error};
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use toml::Spanned;
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::paths::{Os, env_var, home_dir};
use super::*;

type Span = Option<Range<usize>>;
type S<T> = Option<Spanned<T>>;
type Words = S<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    environment: S<Environment>,
    provider: Option<RawProvider>,
    agent: Option<RawAgent>,
    clients: Option<Vec<RawClient>>,
    session: Option<RawSession>,
    workstation: Option<RawWorkstation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    issuer: S<String>,
    client_id: S<String>,
    scopes: Words,
    acr_values: S<String>,
    max_age: S<i64>,
    prompt: S<String>,
    ca_file: S<String>,
    redirect_ports: S<Vec<Spanned<i64>>>,
    login_timeout_secs: S<i64>,
    exchange: Option<RawExchange>,
    audiences: Option<Vec<RawAudience>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    name: S<String>,
    route: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExchange {
    method: S<ExchangeMethod>,
    relay_url: S<String>,
    key_file: S<String>,
    alg: Option<SigningAlg>,
    kid: S<String>,
    secret_env: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    socket: S<String>,
    store: Option<StoreKind>,
    data_dir: S<String>,
    client_policy: Option<ClientPolicy>,
    audit_sync: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: S<String>,
    path: S<String>,
    sha256: S<String>,
    script: S<String>,
    script_sha256: S<String>,
    methods: Words,
    audiences: Words,
    scopes: Words,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSession {
    refresh_margin_secs: S<i64>,
    expiring_notice_secs: S<i64>,
    inactivity_secs: S<i64>,
    inactivity_action: Option<InactivityAction>,
    absolute_secs: S<i64>,
    end_session_at_provider: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkstation {
    on_os_lock: Option<SignalAction>,
    on_card_removal: Option<SignalAction>,
    same_card_unlocks: Option<bool>,
    allow_user_switch: Option<bool>,
}

const ISSUER_EXAMPLE: &str = "\"https://login.example.org/realms/staff\"";
const CLIENT_ID_EXAMPLE: &str = "\"123456789012.apps.national\"";
const RELAY_EXAMPLE: &str = "\"https://relay.example.nhs.uk/\"";
const PORTS_EXAMPLE: &str = "[8400, 8401]";
const SHA_EXAMPLE: &str = "\"<64 hex digits>\"";
// The example in a message is one the reader's OS would report.
const PATH_EXAMPLE: &str = if cfg!(windows) {
    r"'C:\Program Files\Ward EHR\ehr.exe'"
} else {
    "\"/opt/ehr/bin/ehr\""
};
const PROMPT_VALUES: &[&str] = &["login", "none", "consent", "select_account"];
const SECRET_KEYS: &[&str] = &["client_secret", "clientsecret", "secret"];

/// What a key's value must be and an example of one, for a value of the wrong type.
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
        "provider.redirect_ports" => ("a list of port numbers", PORTS_EXAMPLE),
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
        ("provider", "in [provider]", keys_of::<RawProvider>()),
        (
            "provider.exchange",
            "in [provider.exchange]",
            keys_of::<RawExchange>(),
        ),
        ("agent", "in [agent]", keys_of::<RawAgent>()),
        ("session", "in [session]", keys_of::<RawSession>()),
        (
            "workstation",
            "in [workstation]",
            keys_of::<RawWorkstation>(),
        ),
        ("clients", "in a [[clients]] entry", keys_of::<RawClient>()),
        (
            "provider.audiences",
            "in a [[provider.audiences]] entry",
            keys_of::<RawAudience>(),
        ),
    ]
}

/// One key of the document, wherever it is (unknown and inline tables included), in file order.
/// An entry of a list of tables is recorded too, under the key `""`, at its header.
struct KeyAt {
    /// Dotted path of the table holding it: `""`, `provider.exchange`, `clients`.
    table: String,
    /// Which entry, when the table is an entry of a list of tables.
    entry: Option<usize>,
    key: String,
    span: Span,
    value: Span,
    is_table: bool,
    /// What was written, in the words of our messages, and the text if it is text.
    kind: &'static str,
    text: Option<String>,
}

fn collect_keys(t: &dyn TableLike, table: &str, entry: Option<usize>, out: &mut Vec<KeyAt>) {
    for (key, item) in t.iter() {
        let (kind, text) = match item.as_value() {
            Some(Value::String(s)) => ("text", Some(s.value().clone())),
            Some(Value::Integer(_)) => ("a whole number", None),
            Some(Value::Float(_)) => ("a decimal number", None),
            Some(Value::Boolean(_)) => ("true/false", None),
            Some(Value::Datetime(_)) => ("a date or time", None),
            Some(Value::Array(_)) => ("a list", None),
            _ if item.is_array_of_tables() => ("a list", None),
            _ => ("a table", None),
        };
        let span = t.key(key).and_then(|k| k.span()).or_else(|| item.span());
        let is_table = matches!(item, Item::Table(_) | Item::ArrayOfTables(_));
        let (table, key, value) = (table.to_owned(), key.to_owned(), item.span());
        let path = join_path(&table, &key);
        out.push(KeyAt {
            table,
            entry,
            key,
            span,
            value,
            is_table,
            kind,
            text,
        });
        match item {
            Item::Table(t) => collect_keys(t, &path, None, out),
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

fn collect_entry(t: &dyn TableLike, span: Span, table: &str, i: usize, out: &mut Vec<KeyAt>) {
    let (table, key, kind) = (table.to_owned(), String::new(), "a table");
    let (value, text) = (span.clone(), None);
    out.push(KeyAt {
        entry: Some(i),
        span,
        value,
        is_table: true,
        kind,
        text,
        key,
        table: table.clone(),
    });
    collect_keys(t, &table, Some(i), out);
}

fn collect_value(v: &Value, path: &str, out: &mut Vec<KeyAt>) {
    match v {
        Value::InlineTable(t) => collect_keys(t, path, None, out),
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

fn at<T>(v: &Spanned<T>) -> Span {
    Some(v.span())
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
    keys: Vec<KeyAt>,
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

    /// `{key} = {value as written} is not valid: {reason}.`
    fn invalid(&self, key: &str, span: &Span, reason: &str, fix: impl Into<String>) -> ConfigError {
        let message = format!("{key} = {} is not valid: {reason}.", self.snippet(span));
        self.err(span, message, fix)
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

    /// Where a table (or an entry of `[[clients]]`) starts: its header, else its first key.
    fn table_span(&self, table: &str, entry: Option<usize>) -> Span {
        let (parent, key) = match (entry, table.rsplit_once('.')) {
            (Some(_), _) => (table, ""),
            (None, Some((parent, key))) => (parent, key),
            (None, None) => ("", table),
        };
        let at = |k: &&KeyAt| k.table == parent && k.entry == entry && k.key == key;
        let first = |k: &&KeyAt| k.table == table && k.entry == entry;
        let found = self.keys.iter().filter(at).find(|k| k.span.is_some());
        found
            .or_else(|| self.keys.iter().find(first))
            .and_then(|k| k.span.clone())
    }

    /// A path from the file: `~/` is the home folder; relative paths are read from the config
    /// file's folder.
    fn resolve(&self, raw: &str) -> PathBuf {
        let home = || home_dir(&env_var, Os::CURRENT);
        let rest = raw.strip_prefix("~/").or_else(|| raw.strip_prefix("~\\"));
        match (raw == "~", rest, home()) {
            (true, _, Some(h)) => h,
            (_, Some(rest), Some(h)) => h.join(rest),
            _ if Path::new(raw).is_absolute() => PathBuf::from(raw),
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
            .find(|k| k.span == span || k.value == span);
        let inside = |k: &&KeyAt| match (&k.value, &span) {
            (Some(v), Some(s)) => v.start <= s.start && s.end <= v.end,
            _ => false,
        };
        let Some(at) = exact.or_else(|| self.keys.iter().filter(named).rfind(inside)) else {
            let message = e.message().trim().trim_end_matches('.');
            let fix = "Check the TOML on that line against docs/configuration.md.";
            return self.err(&span, format!("{message}."), fix);
        };
        let (key, path, shown) = (&at.key, join_path(&at.table, &at.key), self.snippet(&span));
        if e.message().starts_with("unknown field") {
            return self.unknown_key(at);
        }
        if at.value != span {
            if path == "provider.redirect_ports" {
                return port_error(self, &span);
            }
            return self.err(
                &span,
                format!("{key} contains {shown}, which is not text in double quotes."),
                format!(
                    "Write each entry in double quotes, e.g. {key} = {}.",
                    shape(&path).1
                ),
            );
        }
        let found = at.kind;
        if path == "clients" {
            return self.err(
                &span,
                format!(
                    "clients = {shown} is not valid: clients must be a list of [[clients]] \
                     sections, not {found}."
                ),
                "Write each program as its own section: a line [[clients]], then \
                 name = \"Ward EHR\" and path = \"/opt/ehr/bin/ehr\" on the lines below.",
            );
        }
        if display_entry(&at.table, key).starts_with('[') {
            let fix = format!("Write it as a section: a line [{path}] followed by its keys.");
            return self.invalid(
                key,
                &span,
                &format!("{key} must be a table, not {found}"),
                fix,
            );
        }
        if let Some(names) = choices(key) {
            let near = at
                .text
                .as_deref()
                .and_then(|s| suggest(s, names.iter().copied()));
            let near = near
                .map(|n| format!("Did you mean \"{n}\"? "))
                .unwrap_or_default();
            let options: Vec<String> = names.iter().map(|n| format!("{key} = \"{n}\"")).collect();
            let fix = format!("{near}Write {}.", join_or(&options));
            return self.err(&span, format!("{key} = {shown} is not valid."), fix);
        }
        let (wanted, example) = shape(&path);
        let reason = format!("{key} must be {wanted}, not {found}");
        self.invalid(key, &span, &reason, format!("Write {key} = {example}."))
    }

    fn unknown_key(&self, at: &KeyAt) -> ConfigError {
        let path = join_path(&at.table, &at.key);
        let tables = tables();
        let own = tables.iter().find(|(t, _, _)| *t == at.table);
        let allowed = own.map(|(_, _, keys)| *keys).unwrap_or_default();
        let message = match (at.is_table, at.table.as_str(), at.entry) {
            (true, _, Some(_)) => format!("unknown table [[{path}]]."),
            (true, _, None) => format!("unknown table [{path}]."),
            (false, "", _) => format!("unknown key \"{}\" at the top level.", at.key),
            (false, table, Some(i)) => {
                format!("unknown key \"{}\" in [[{table}]] entry {}.", at.key, i + 1)
            }
            (false, table, None) => format!("unknown key \"{}\" in [{table}].", at.key),
        };
        let mut fix = String::new();
        if let Some(near) = suggest(&at.key, allowed.iter().copied()) {
            let shown = display_entry(&at.table, near);
            let shown = if shown.starts_with('[') {
                shown
            } else {
                format!("\"{shown}\"")
            };
            fix = format!("Did you mean {shown}? ");
        } else if let Some((_, home, _)) = tables.iter().find(|(_, _, k)| k.contains(&&*at.key)) {
            fix = format!("\"{}\" belongs {home}: move it there. ", at.key);
        }
        let valid: Vec<String> = allowed
            .iter()
            .map(|k| display_entry(&at.table, k))
            .collect();
        fix.push_str(&format!("Valid keys: {}.", valid.join(", ")));
        self.err(&at.span, message, fix)
    }

    /// A duration in seconds: `default` when absent, else `min..=MAX_SECS`.
    fn secs(
        &self,
        key: &str,
        v: &S<i64>,
        (min, default): (u64, u64),
        zero_fix: Option<&str>,
    ) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        match u64::try_from(n) {
            Ok(n) if (min..=MAX_SECS).contains(&n) => Ok(n),
            _ => Err(self.invalid(
                key,
                &at(v),
                &format!("it must be between {min} and {MAX_SECS}"),
                match zero_fix {
                    Some(fix) if n == 0 => fix.to_owned(),
                    _ => format!("Write {key} = {default}."),
                },
            )),
        }
    }

    /// A list of single words (scopes, audiences): no empty entries, no spaces. Duplicates dropped.
    fn words(&self, path: &str, v: &Words) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(list) = v else { return Ok(None) };
        let key = path.rsplit('.').next().unwrap_or(path);
        let mut out: Vec<String> = Vec::with_capacity(list.get_ref().len());
        for word in list.get_ref() {
            if word.get_ref().is_empty()
                || word
                    .get_ref()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(self.err(
                    &at(word),
                    format!(
                        "{key} entry {} is not valid: each entry is one word, with no spaces.",
                        self.snippet(&at(word))
                    ),
                    format!(
                        "Write each as its own entry, e.g. {key} = {}.",
                        shape(path).1
                    ),
                ));
            }
            if !out.contains(word.get_ref()) {
                out.push(word.get_ref().clone());
            }
        }
        Ok(Some(out))
    }

    /// A path: not empty; resolved from the config folder; optionally required to be a file.
    fn path(
        &self,
        path: &str,
        v: &S<String>,
        what: &str,
        must_exist: bool,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let (key, example) = (path.rsplit('.').next().unwrap_or(path), shape(path).1);
        if v.get_ref().trim().is_empty() {
            let fix =
                format!("Write the path of {what}, e.g. {key} = {example}, or leave {key} out.");
            return Err(self.invalid(key, &at(v), "it is empty", fix));
        }
        let resolved = self.resolve(v.get_ref());
        if must_exist && self.check_files && !resolved.is_file() {
            return Err(self.err(
                &at(v),
                format!(
                    "{key} = {} names a file that does not exist or is not a file: {}.",
                    self.snippet(&at(v)),
                    resolved.display()
                ),
                format!("Write the path of {what} (a relative path is read from the config file's folder)."),
            ));
        }
        Ok(Some(resolved))
    }
}

fn port_error(ctx: &Ctx<'_>, span: &Span) -> ConfigError {
    ctx.err(
        span,
        format!(
            "redirect_ports entry {} is not valid: a port is a whole number from 1 to 65535.",
            ctx.snippet(span)
        ),
        format!(
            "Write redirect_ports = {PORTS_EXAMPLE}, or leave redirect_ports out to use a free \
             port chosen at each sign-in."
        ),
    )
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
    collect_keys(doc.as_table(), "", None, &mut keys);
    let base = origin.parent().map(Path::to_path_buf).unwrap_or_default();
    let ctx = Ctx {
        text,
        file: origin,
        base,
        check_files,
        keys,
    };

    let secret = ctx
        .keys
        .iter()
        .find(|k| SECRET_KEYS.contains(&k.key.to_lowercase().replace('-', "_").as_str()));
    if let Some(at) = secret {
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
             variable in [provider.exchange]: method = \"client_secret_post\" and \
             secret_env = \"CIS2_CLIENT_SECRET\".",
        ));
    }

    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.serde_error(&e))?;
    let provider_span = ctx.table_span("provider", None);
    let (environment, environment_span) = match (raw.environment, &raw.provider) {
        (Some(env), _) => (*env.get_ref(), at(&env)),
        (None, None) => (Environment::Sandbox, None),
        (None, Some(_)) => {
            return Err(ctx.err(
                &provider_span,
                "the file has a [provider] section but no environment, so it does not say \
                 which provider this is.",
                "Add environment = \"int\", environment = \"live\" or environment = \"custom\" \
                 at the top of the file, before [provider].",
            ));
        }
    };
    let provider = match (environment, raw.provider) {
        (Environment::Sandbox, Some(_)) => {
            return Err(ctx.err(
                &provider_span,
                "environment = \"sandbox\" uses the agent's embedded test provider, so it \
                 takes no [provider] section.",
                "Remove the [provider] section, or set environment = \"int\", \
                 environment = \"live\" or environment = \"custom\" to sign in against a real \
                 provider.",
            ));
        }
        (Environment::Sandbox, None) => None,
        (env, p) => Some(read_provider(&ctx, p, env, environment_span)?),
    };

    let a = raw.agent.unwrap_or_default();
    let agent = AgentConfig {
        socket: ctx.path("agent.socket", &a.socket, "the agent's socket", false)?,
        store: a.store.unwrap_or_default(),
        data_dir: ctx.path(
            "agent.data_dir",
            &a.data_dir,
            "the agent's data folder",
            false,
        )?,
        client_policy: a.client_policy,
        audit_sync: a.audit_sync.unwrap_or(false),
    };
    let clients = (raw.clients.into_iter().flatten().enumerate())
        .map(|(i, c)| read_client(&ctx, c, i))
        .collect::<Result<_, _>>()?;
    let (s, d) = (raw.session.unwrap_or_default(), SessionConfig::default());
    let session = SessionConfig {
        refresh_margin_secs: ctx.secs(
            "refresh_margin_secs",
            &s.refresh_margin_secs,
            (0, d.refresh_margin_secs),
            None,
        )?,
        expiring_notice_secs: ctx.secs(
            "expiring_notice_secs",
            &s.expiring_notice_secs,
            (0, d.expiring_notice_secs),
            None,
        )?,
        inactivity_secs: ctx.secs(
            "inactivity_secs",
            &s.inactivity_secs,
            (1, d.inactivity_secs),
            Some(
                "To switch the inactivity timeout off, write inactivity_action = \"none\" \
                 instead; otherwise write inactivity_secs = 900.",
            ),
        )?,
        inactivity_action: s.inactivity_action.unwrap_or(d.inactivity_action),
        absolute_secs: ctx.secs(
            "absolute_secs",
            &s.absolute_secs,
            (1, d.absolute_secs),
            Some("A session needs a maximum length: write absolute_secs = 43200 (12 hours)."),
        )?,
        end_session_at_provider: s
            .end_session_at_provider
            .unwrap_or(d.end_session_at_provider),
    };
    let (w, d) = (
        raw.workstation.unwrap_or_default(),
        WorkstationConfig::default(),
    );
    let workstation = WorkstationConfig {
        on_os_lock: w.on_os_lock.unwrap_or(d.on_os_lock),
        on_card_removal: w.on_card_removal.unwrap_or(d.on_card_removal),
        same_card_unlocks: w.same_card_unlocks.unwrap_or(d.same_card_unlocks),
        allow_user_switch: w.allow_user_switch.unwrap_or(d.allow_user_switch),
    };
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
    v: &Spanned<String>,
    (example, what): (&str, &str),
    allow_query: bool,
) -> Result<(), ConfigError> {
    let (value, span, shown) = (v.get_ref(), at(v), ctx.snippet(&at(v)));
    let fix = format!("Write {key} = {example}.");
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ctx.invalid(key, &span, "a URL has no spaces", fix));
    }
    let url = url::Url::parse(value).map_err(|e| {
        ctx.err(
            &span,
            format!("{key} = {shown} is not a valid URL ({e})."),
            &*fix,
        )
    })?;
    let lower = value.to_ascii_lowercase();
    let http = lower.starts_with("http://") && url.scheme() == "http";
    if http && !is_loopback_host(&url) {
        return Err(ctx.err(
            &span,
            format!("{key} = {shown} uses plain http to another computer."),
            format!(
                "Use https:// ({fix}); plain http is allowed only when {what} runs on this \
                 computer, e.g. http://127.0.0.1:8080/ or http://[::1]:8080/."
            ),
        ));
    }
    let parts = if allow_query {
        "#fragment"
    } else {
        "?query or #fragment"
    };
    let https = lower.starts_with("https://") && url.scheme() == "https";
    let reason = if !(http || https) {
        "it must start with https://".to_owned()
    } else if url.host_str().is_none_or(str::is_empty) {
        "it has no host name".to_owned()
    } else if url.fragment().is_some() || (!allow_query && url.query().is_some()) {
        format!("it must not have a {parts}")
    } else {
        return Ok(());
    };
    Err(ctx.invalid(key, &span, &reason, fix))
}

fn read_provider(
    ctx: &Ctx<'_>,
    p: Option<RawProvider>,
    env: Environment,
    env_span: Span,
) -> Result<ProviderConfig, ConfigError> {
    let name = env.as_str();
    let Some(p) = p else {
        let fix = if env == Environment::Custom {
            format!(
                "Add a [provider] section with issuer = {ISSUER_EXAMPLE} and client_id = \"…\" \
                 (this service's client ID at that provider)."
            )
        } else {
            format!(
                "Add a [provider] section with client_id = {CLIENT_ID_EXAMPLE} (the client ID \
                 NHS England registered for this service)."
            )
        };
        let message =
            format!("environment = \"{name}\" needs a [provider] section, and the file has none.");
        return Err(ctx.err(&env_span, message, fix));
    };
    let p_span = ctx.table_span("provider", None);

    let issuer = match p.issuer {
        Some(v) => {
            check_url(ctx, "issuer", &v, (ISSUER_EXAMPLE, "the provider"), false)?;
            v.into_inner()
        }
        None => env.preset_issuer().map(str::to_owned).ok_or_else(|| {
            ctx.err(
                &p_span,
                format!("[provider] has no issuer, and environment = \"{name}\" needs one."),
                format!(
                    "Add issuer = {ISSUER_EXAMPLE} (the provider's issuer exactly as its \
                     discovery document gives it), or use environment = \"int\" or \
                     environment = \"live\" for NHS CIS2."
                ),
            )
        })?,
    };

    let client_id = match p.client_id {
        Some(v)
            if v.get_ref().is_empty()
                || v.get_ref()
                    .contains(|c: char| c.is_whitespace() || c.is_control()) =>
        {
            let reason = "it must be the client ID the provider registered, with no spaces";
            let fix = format!("Write client_id = {CLIENT_ID_EXAMPLE}.");
            return Err(ctx.invalid("client_id", &at(&v), reason, fix));
        }
        Some(v) => v.into_inner(),
        None => {
            return Err(ctx.err(
                &p_span,
                format!("[provider] has no client_id, and environment = \"{name}\" needs one."),
                format!(
                    "Add client_id = {CLIENT_ID_EXAMPLE} (the client ID registered for this \
                     service) to [provider]."
                ),
            ));
        }
    };

    let scopes = match ctx.words("provider.scopes", &p.scopes)? {
        None => DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        Some(scopes) if scopes.iter().any(|s| s == "openid") => scopes,
        Some(scopes) => {
            let span = p.scopes.as_ref().and_then(at);
            let listed: Vec<String> = scopes.iter().map(|s| format!(", \"{s}\"")).collect();
            return Err(ctx.err(
                &span,
                format!(
                    "scopes = {} does not include \"openid\".",
                    ctx.snippet(&span)
                ),
                format!(
                    "OpenID Connect needs it: write scopes = [\"openid\"{}].",
                    listed.concat()
                ),
            ));
        }
    };

    let acr_values = match p.acr_values {
        None => Some(DEFAULT_ACR_VALUES.to_owned()),
        Some(v) if v.get_ref().contains(char::is_control) => {
            return Err(ctx.err(
                &at(&v),
                "acr_values is not valid: it contains control characters.",
                "Write acr_values = \"AAL2_OR_AAL3_ANY\" (or \"AAL3_ANY\" for smartcard-grade \
                 sign-in only).",
            ));
        }
        Some(v) => Some(v.get_ref().trim().to_owned()).filter(|acr| !acr.is_empty()),
    };

    let prompt = match p.prompt {
        None => Some(DEFAULT_PROMPT.to_owned()),
        Some(v) => {
            let words: Vec<&str> = v.get_ref().split_whitespace().collect();
            if words.iter().any(|w| !PROMPT_VALUES.contains(w))
                || (words.contains(&"none") && words.len() > 1)
            {
                return Err(ctx.err(
                    &at(&v),
                    format!("prompt = {} is not valid.", ctx.snippet(&at(&v))),
                    "Write prompt = \"login\" (CIS2 role selection needs it), prompt = \"consent\", \
                     prompt = \"select_account\", prompt = \"none\", or prompt = \"\" to send no \
                     prompt.",
                ));
            }
            Some(words.join(" ")).filter(|words| !words.is_empty())
        }
    };

    let ca_file = ctx.path(
        "provider.ca_file",
        &p.ca_file,
        "a PEM file of extra CA certificates",
        true,
    )?;
    let exchange = read_exchange(ctx, p.exchange, env, &p_span)?;
    Ok(ProviderConfig {
        issuer,
        client_id,
        scopes,
        acr_values,
        max_age: Some(ctx.secs("max_age", &p.max_age, (0, DEFAULT_MAX_AGE), None)?),
        prompt,
        ca_file,
        redirect_ports: read_ports(ctx, &p.redirect_ports)?,
        login_timeout_secs: ctx.secs(
            "login_timeout_secs",
            &p.login_timeout_secs,
            (1, DEFAULT_LOGIN_TIMEOUT_SECS),
            Some("A sign-in needs some time in the browser: write login_timeout_secs = 300."),
        )?,
        audiences: read_audiences(ctx, p.audiences.unwrap_or_default(), &exchange)?,
        exchange,
    })
}

fn read_audiences(
    ctx: &Ctx<'_>,
    raw: Vec<RawAudience>,
    exchange: &Exchange,
) -> Result<Vec<AudienceRoute>, ConfigError> {
    let word = |key: &str, v: &Spanned<String>| {
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
        if !v.get_ref().is_empty() && v.get_ref().bytes().all(ok) {
            return Ok(v.get_ref().clone());
        }
        Err(ctx.err(
            &at(v),
            format!(
                "[[provider.audiences]] {key} = {} is not valid: it must be letters, digits, - _ or .",
                ctx.snippet(&at(v))
            ),
            format!("Write {key} = \"apim\"."),
        ))
    };
    let mut out: Vec<AudienceRoute> = Vec::new();
    for entry in raw {
        let Some(v) = &entry.name else {
            return Err(ctx.err(
                &ctx.table_span("provider.audiences", None),
                "A [[provider.audiences]] entry has no name.",
                "Write name = \"apim\" (what programs ask for) in each [[provider.audiences]] entry.",
            ));
        };
        let name = word("name", v)?;
        if exchange.method != ExchangeMethod::Relay {
            return Err(ctx.err(
                &at(v),
                format!(
                    "[[provider.audiences]] {name:?} needs the relay: API Platform tokens are exchanged by \
                     cis2-relay, which holds the platform key, and [provider.exchange] method is \"{}\".",
                    exchange.method.as_str()
                ),
                "Set [provider.exchange] method = \"relay\" with relay_url, or remove the [[provider.audiences]] entry.",
            ));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(ctx.err(
                &at(v),
                format!("[[provider.audiences]] name {name:?} is given twice."),
                "Give each [[provider.audiences]] entry its own name.",
            ));
        }
        let route = entry.route.as_ref().map(|r| word("route", r)).transpose()?;
        let route = route.unwrap_or_else(|| name.clone());
        out.push(AudienceRoute { name, route });
    }
    Ok(out)
}

fn read_ports(ctx: &Ctx<'_>, v: &S<Vec<Spanned<i64>>>) -> Result<Vec<u16>, ConfigError> {
    let mut ports = Vec::new();
    for port in v.iter().flat_map(|v| v.get_ref()) {
        match u16::try_from(*port.get_ref()).ok().filter(|n| *n != 0) {
            Some(n) if ports.contains(&n) => {
                let message = format!("redirect_ports lists port {n} twice.");
                return Err(ctx.err(&at(port), message, "List each port once."));
            }
            Some(n) => ports.push(n),
            None => return Err(port_error(ctx, &at(port))),
        }
    }
    Ok(ports)
}

fn read_exchange(
    ctx: &Ctx<'_>,
    x: Option<RawExchange>,
    env: Environment,
    provider_span: &Span,
) -> Result<Exchange, ConfigError> {
    let default_method = match env {
        Environment::Int | Environment::Live => ExchangeMethod::Relay,
        Environment::Sandbox | Environment::Custom => ExchangeMethod::None,
    };
    let x = match x {
        Some(x) => x,
        None if default_method == ExchangeMethod::Relay => {
            return Err(ctx.err(
                provider_span,
                format!(
                    "environment = \"{env}\" swaps the sign-in code for tokens through a relay by \
                     default, and there is no [provider.exchange] section with its relay_url."
                ),
                format!(
                    "Add a [provider.exchange] section with method = \"relay\" and relay_url = \
                     {RELAY_EXAMPLE}, or choose another method there: method = \
                     \"private_key_jwt\", method = \"client_secret_post\" or method = \"none\"."
                ),
            ));
        }
        None => RawExchange::default(),
    };
    let (method, method_span, stated) = match &x.method {
        Some(m) => (*m.get_ref(), at(m), format!("method = \"{}\"", m.get_ref())),
        None => (
            default_method,
            ctx.table_span("provider.exchange", None),
            format!(
                "[provider.exchange] has no method, so it is \"{default_method}\" (the default \
                 for environment = \"{env}\"), which"
            ),
        ),
    };
    if let Some(v) = &x.relay_url {
        check_url(ctx, "relay_url", v, (RELAY_EXAMPLE, "the relay"), true)?;
    }
    let what = "the PEM file holding the client's RSA private key";
    let must_exist = method == ExchangeMethod::PrivateKeyJwt;
    let key_file = ctx.path("provider.exchange.key_file", &x.key_file, what, must_exist)?;
    if let Some(v) = x
        .kid
        .as_ref()
        .filter(|v| cis2_jose::check_kid(v.get_ref()).is_err())
    {
        return Err(ctx.err(
            &at(v),
            format!(
                "kid = {} is not a key id this agent can send.",
                ctx.snippet(&at(v))
            ),
            "Write the kid registered with CIS2 for this key, 1 to 128 letters, digits, - or _ \
             (e.g. kid = \"eps-cpt-ui-int\"), or leave kid out to send the key's RFC 7638 \
             thumbprint.",
        ));
    }
    let is_name = |name: &str| {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if let Some(v) = x.secret_env.as_ref().filter(|v| !is_name(v.get_ref())) {
        // The value is not quoted back: it may be the secret itself.
        return Err(ctx.err(
            &at(v),
            "secret_env is not the name of an environment variable (letters, digits and _, not \
             starting with a digit).",
            "secret_env names the variable that holds the secret, never the secret itself: write \
             secret_env = \"CIS2_CLIENT_SECRET\" and set that variable in the agent's \
             environment.",
        ));
    }

    let missing = match method {
        ExchangeMethod::Relay if x.relay_url.is_none() => Some((
            "relay_url",
            format!("relay_url = {RELAY_EXAMPLE} (the address of your organisation's cis2-relay)"),
        )),
        ExchangeMethod::PrivateKeyJwt if key_file.is_none() => Some((
            "key_file",
            format!("key_file = \"client-key.pem\" ({what})"),
        )),
        ExchangeMethod::ClientSecretPost if x.secret_env.is_none() => Some((
            "secret_env",
            "secret_env = \"CIS2_CLIENT_SECRET\" (the name of the environment variable holding \
             the client secret; the secret itself never goes in the file)"
                .to_owned(),
        )),
        _ => None,
    };
    if let Some((key, add)) = missing {
        let others = ExchangeMethod::NAMES
            .iter()
            .filter(|n| **n != method.as_str());
        let others: Vec<String> = others.map(|n| format!("method = \"{n}\"")).collect();
        return Err(ctx.err(
            &method_span,
            format!("{stated} needs {key} in [provider.exchange], and there is none."),
            format!(
                "Add {add} to [provider.exchange], or choose another method: {}.",
                join_or(&others)
            ),
        ));
    }
    Ok(Exchange {
        method,
        relay_url: x.relay_url.map(Spanned::into_inner),
        key_file,
        alg: x.alg.unwrap_or_default(),
        secret_env: x.secret_env.map(Spanned::into_inner),
        kid: x.kid.map(Spanned::into_inner),
    })
}

fn read_client(ctx: &Ctx<'_>, c: RawClient, i: usize) -> Result<ClientRule, ConfigError> {
    let label = format!("[[clients]] entry {}", i + 1);
    let entry_span = ctx.table_span("clients", Some(i));
    let invalid = |key: &str, v: &Spanned<String>, reason: &str, fix: String| {
        let shown = ctx.snippet(&at(v));
        ctx.err(
            &at(v),
            format!("{key} = {shown} in {label} is not valid: {reason}."),
            fix,
        )
    };

    let name = match &c.name {
        Some(v)
            if v.get_ref().trim().is_empty() || v.get_ref().trim().contains(char::is_control) =>
        {
            let fix = "Write name = \"Ward EHR\" (the name shown to people).";
            return Err(invalid("name", v, "it is empty", fix.into()));
        }
        Some(v) => v.get_ref().trim().to_owned(),
        None => {
            return Err(ctx.err(
                &entry_span,
                format!("{label} has no name."),
                "Add name = \"Ward EHR\" (the name shown to people when this program uses the \
                 agent).",
            ));
        }
    };
    let absolute = |key: &str, v: &S<String>, what: &str, example: &str| match v {
        Some(v) if !Path::new(v.get_ref()).is_absolute() => {
            let reason = format!("it must be the full path of {what}");
            let fix = format!("Write {key} = {example} (the absolute path).");
            Err(invalid(key, v, &reason, fix))
        }
        v => Ok(v.as_ref().map(|v| PathBuf::from(v.get_ref()))),
    };
    let hash = |key: &str, v: &S<String>, what: &str| match v {
        Some(v)
            if v.get_ref().trim().len() != 64
                || !v.get_ref().trim().chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            let reason = format!("it must be the {what}'s SHA-256 as 64 hexadecimal digits");
            let fix = format!(
                "Write {key} = {SHA_EXAMPLE} as printed by `sha256sum FILE` (Linux), \
                 `shasum -a 256 FILE` (macOS) or `certutil -hashfile FILE SHA256` (Windows)."
            );
            Err(invalid(key, v, &reason, fix))
        }
        v => Ok(v.as_ref().map(|v| v.get_ref().trim().to_ascii_lowercase())),
    };
    let path = absolute("path", &c.path, "the program's executable", PATH_EXAMPLE)?;
    let sha256 = hash("sha256", &c.sha256, "executable")?;
    let script_sha256 = hash("script_sha256", &c.script_sha256, "script")?;
    let script_what = "the script the interpreter runs";
    let script = absolute("script", &c.script, script_what, "\"/opt/ehr/ehr.py\"")?;

    if path.is_none() && sha256.is_none() {
        return Err(ctx.err(
            &entry_span,
            format!(
                "{label} (\"{name}\") has neither path nor sha256, so no program can match it."
            ),
            format!(
                "Add path = {PATH_EXAMPLE} (the executable) and/or sha256 = {SHA_EXAMPLE} (its \
                 SHA-256)."
            ),
        ));
    }
    if (script.is_some() || script_sha256.is_some())
        && let Some(exe) = path.as_deref().filter(|p| !crate::peer::is_interpreter(p))
    {
        return Err(ctx.err(
            &entry_span,
            format!(
                "{label} (\"{name}\") names a script, but {} is not an interpreter this agent \
                 knows (python, node, java, ruby, perl, php, dotnet, a shell…): a native program \
                 is never matched by its command line.",
                exe.display()
            ),
            "Remove script and script_sha256, or set path to the interpreter that runs the script.",
        ));
    }

    let mut methods: Option<Vec<String>> = c.methods.as_ref().map(|_| Vec::new());
    for m in c.methods.iter().flat_map(|list| list.get_ref()) {
        let method = m.get_ref();
        if !CLIENT_METHODS.contains(&method.as_str()) {
            let near = suggest(method, CLIENT_METHODS).map(|n| format!("Did you mean \"{n}\"? "));
            return Err(ctx.err(
                &at(m),
                format!(
                    "methods entry {} in {label} is not a method of the agent.",
                    ctx.snippet(&at(m))
                ),
                format!(
                    "{}Valid methods: {}.",
                    near.unwrap_or_default(),
                    CLIENT_METHODS.join(", ")
                ),
            ));
        }
        if let Some(list) = methods.as_mut().filter(|list| !list.contains(method)) {
            list.push(method.clone());
        }
    }

    Ok(ClientRule {
        name,
        path,
        sha256,
        script,
        script_sha256,
        methods,
        audiences: ctx
            .words("clients.audiences", &c.audiences)?
            .unwrap_or_default(),
        scopes: ctx.words("clients.scopes", &c.scopes)?.unwrap_or_default(),
    })
}
