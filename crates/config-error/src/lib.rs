//! What a config-file mistake looks like, shared by the agent's (`cis2-core`) and the relay's
//! (`cis2-relay`) config readers: the file, the 1-based line, what is wrong and what to write
//! instead. It also holds the few helpers both readers use to build one: the item at a key path of
//! the parsed file (`toml_edit`) and where it is, the line of a TOML span, a TOML syntax error
//! turned into a [`ConfigError`], the key and the valid keys in serde's error for an unknown key,
//! a "did you mean" from `strsim`, and the one rule for an http(s) address in a config file.
//! A crate of its own because the relay must not depend on the agent's crate.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use toml_edit::Item;

/// A config file that cannot be used: where, what is wrong, and what to write instead.
///
/// Displays as `{file}:{line}: {message} {fix}`, or `{file}: {message} {fix}` when no line applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, when the problem is on one.
    pub line: Option<usize>,
    /// What is wrong, as a sentence.
    pub message: String,
    /// What to write instead, as a sentence (may be empty when the message says it).
    pub fix: String,
}

impl ConfigError {
    /// A mistake in `file`, on `line` when one applies.
    pub fn new(
        file: impl Into<PathBuf>,
        line: Option<usize>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        let (file, message, fix) = (file.into(), message.into(), fix.into());
        ConfigError {
            file,
            line,
            message,
            fix,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message)?,
            None => write!(f, "{}: {}", self.file.display(), self.message)?,
        }
        if !self.fix.is_empty() {
            write!(f, " {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The 1-based line on which byte `offset` of `text` lies.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The item at a dotted key path of a parsed file: tables and keys by name, entries of a list by
/// number (`clients.1.sha256`, `api_platform.0.token_url`); the path "" is the whole file.
pub fn item_at<'d>(file: &'d Item, path: &str) -> Option<&'d Item> {
    let mut item = file;
    for step in path.split('.').filter(|step| !step.is_empty()) {
        item = match step.parse::<usize>() {
            Ok(i) => item.get(i)?,
            Err(_) => item.get(step)?,
        };
    }
    Some(item)
}

/// Where an item is written: its value, or a table's header, else the table's first key (a table
/// made by dotted keys has no header).
pub fn span_of(item: &Item) -> Option<Range<usize>> {
    item.span().or_else(|| {
        let t = item.as_table_like()?;
        t.iter()
            .find_map(|(k, v)| t.key(k).and_then(|k| k.span()).or_else(|| v.span()))
    })
}

/// A TOML syntax error (the parser's `message` and `span`) as a [`ConfigError`] on its line, with
/// a fix chosen from what went wrong.
pub fn syntax_error(
    text: &str,
    file: PathBuf,
    message: &str,
    span: Option<Range<usize>>,
) -> ConfigError {
    let detail: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let detail = detail.join("; ");
    let lower = detail.to_lowercase();
    let fix = if lower.contains("duplicate") {
        "Each key and each [section] may appear only once; remove or merge the repeated one."
    } else if lower.contains("string") || lower.contains("invalid key") {
        "Put text values in double quotes (store = \"memory\"), write numbers and true/false \
         without quotes, and keep each key = value on its own line."
    } else {
        "Check the TOML on that line: key = value pairs, [section] headings, text values in \
         double quotes, lists in [square brackets]."
    };
    let message = format!(
        "the file is not valid TOML: {}.",
        detail.trim_end_matches('.')
    );
    ConfigError::new(
        file,
        span.map(|span| line_of(text, span.start)),
        message,
        fix,
    )
}

/// The unknown key and the keys the table takes, from serde's error for a `deny_unknown_fields`
/// table (`unknown field `x`, expected one of `a`, `b``): serde's derive knows the valid keys, so no
/// reader keeps a list of its own.
pub fn unknown_field(message: &str) -> Option<(&str, Vec<&str>)> {
    let mut parts = message.strip_prefix("unknown field `")?.split('`');
    let key = parts.next()?;
    Some((key, parts.skip(1).step_by(2).collect()))
}

/// The candidate nearest to `word`, if it is near enough to be a likely typo (case and `-`/`_`
/// aside); a word of four letters or more that starts a candidate ("relay" for "relay_url") is near
/// too.
pub fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word = word.to_lowercase().replace('-', "_");
    let len = word.chars().count();
    candidates
        .into_iter()
        .map(|candidate| {
            let lower = candidate.to_lowercase();
            let prefix = len >= 4 && lower.starts_with(&word);
            let distance = strsim::osa_distance(&word, &lower);
            (distance, prefix, candidate)
        })
        .filter(|(distance, prefix, candidate)| {
            *prefix || *distance <= (len.max(candidate.len()) / 3).max(1)
        })
        .min_by_key(|(distance, _, _)| *distance)
        .map(|(_, _, candidate)| candidate)
}

/// Why an address in a config file (an issuer, a relay's or a token endpoint's URL) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlProblem {
    Spaces,
    /// Not a URL at all; the parser's words.
    NotUrl(String),
    /// `http://` to a host that is not this computer.
    PlainHttpToAnotherComputer,
    NotHttps,
    NoHost,
    Fragment,
    QueryOrFragment,
}

impl fmt::Display for UrlProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlProblem::Spaces => f.write_str("a URL has no spaces"),
            UrlProblem::NotUrl(why) => write!(f, "it is not a URL ({why})"),
            UrlProblem::PlainHttpToAnotherComputer => {
                f.write_str("it uses plain http to another computer")
            }
            UrlProblem::NotHttps => f.write_str("it must start with https://"),
            UrlProblem::NoHost => f.write_str("it has no host name"),
            UrlProblem::Fragment => f.write_str("it must not have a #fragment"),
            UrlProblem::QueryOrFragment => f.write_str("it must not have a ?query or #fragment"),
        }
    }
}

/// Checks an address without changing it (an issuer must stay byte for byte as written, `:443`
/// included): `https://`, or `http://` to this computer only (any 127.0.0.0/8 address, `[::1]` or
/// `localhost`: RFC 8252 §7.3), with a host, no spaces, no fragment, and a query only when
/// `allow_query`.
pub fn check_http_url(value: &str, allow_query: bool) -> Result<(), UrlProblem> {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(UrlProblem::Spaces);
    }
    let url = url::Url::parse(value).map_err(|e| UrlProblem::NotUrl(e.to_string()))?;
    let lower = value.to_ascii_lowercase();
    let http = lower.starts_with("http://") && url.scheme() == "http";
    let https = lower.starts_with("https://") && url.scheme() == "https";
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if http && !loopback {
        return Err(UrlProblem::PlainHttpToAnotherComputer);
    }
    if !(http || https) {
        return Err(UrlProblem::NotHttps);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlProblem::NoHost);
    }
    match (url.fragment(), url.query()) {
        (Some(_), _) if allow_query => Err(UrlProblem::Fragment),
        (Some(_), _) | (_, Some(_)) if !allow_query => Err(UrlProblem::QueryOrFragment),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay's errors carry their fix in the message: no trailing space then. (The agent's
    /// config tests check the rest of the format.)
    #[test]
    fn an_empty_fix_adds_nothing() {
        let e = ConfigError {
            file: "relay.toml".into(),
            line: None,
            message: "cannot read the config file: gone.".into(),
            fix: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "relay.toml: cannot read the config file: gone."
        );
    }

    #[test]
    fn suggestions_catch_typos_swaps_and_prefixes_only() {
        let keys = ["socket", "store", "data_dir", "client_policy"];
        assert_eq!(suggest("sockett", keys), Some("socket"));
        assert_eq!(suggest("stroe", keys), Some("store"), "a swap is one edit");
        assert_eq!(suggest("Data-Dir", keys), Some("data_dir"));
        assert_eq!(suggest("client", keys), Some("client_policy"));
        assert_eq!(suggest("environment", keys), None);
    }

    #[test]
    fn an_unknown_field_gives_the_key_and_the_valid_ones() {
        let message = "unknown field `stor`, expected one of `socket`, `store`";
        assert_eq!(
            unknown_field(message),
            Some(("stor", vec!["socket", "store"]))
        );
        let message = "unknown field `x`, there are no fields";
        assert_eq!(unknown_field(message), Some(("x", vec![])));
        assert_eq!(
            unknown_field("invalid type: string \"a\", expected u64"),
            None
        );
    }

    /// The relay's and the agent's readers both place every mistake this way.
    #[test]
    fn a_key_path_finds_the_item_where_it_is_written() {
        let text = "top = 1\ninline = { x = 5 }\n[a]\nx = 1\n[[list]]\nx = 2\n[[list]]\n\
                    x = [3, 4]\n[b.c]\n[d]\ne.x = 6\n";
        let file = toml_edit::ImDocument::parse(text).unwrap();
        let line = |path: &str| {
            let item = item_at(file.as_item(), path);
            item.and_then(span_of).map(|span| line_of(text, span.start))
        };
        assert_eq!(line("a.x"), Some(4));
        assert_eq!(
            line("list.1.x"),
            Some(8),
            "the second entry's x, not the first's"
        );
        assert_eq!(line("list.1.x.1"), Some(8));
        assert_eq!(line("inline.x"), Some(2));
        assert_eq!(line("b.c"), Some(9), "a table at its header");
        assert_eq!(line("d.e"), Some(11), "a dotted-key table at its first key");
        assert_eq!(line("a.y"), None);
        assert_eq!(line("list.2"), None);
        assert_eq!(
            item_at(file.as_item(), "top").and_then(|i| i.as_integer()),
            Some(1)
        );
    }

    /// One rule for both readers: the agent's and the relay's addresses are judged alike.
    #[test]
    fn an_address_is_https_or_http_to_this_computer() {
        for good in [
            "https://idp.example.org:443/realms/x",
            "HTTPS://idp.example.org",
            "http://127.0.0.1:8080/",
            "http://127.0.0.2/",
            "http://[::1]:8080",
            "http://localhost/x",
            "http://LocalHost/x",
        ] {
            assert_eq!(check_http_url(good, false), Ok(()), "{good}");
        }
        let problem = |url: &str, query: bool| check_http_url(url, query).unwrap_err();
        assert_eq!(
            problem("http://idp.example.org", false),
            UrlProblem::PlainHttpToAnotherComputer
        );
        assert_eq!(
            problem("http://127.0.0.1.example.org", false),
            UrlProblem::PlainHttpToAnotherComputer,
            "a name that starts like a loopback address is another computer"
        );
        assert_eq!(
            problem("ftp://idp.example.org", false),
            UrlProblem::NotHttps
        );
        assert_eq!(
            problem("https://idp.example.org/ x", false),
            UrlProblem::Spaces
        );
        assert!(matches!(
            problem("idp.example.org", false),
            UrlProblem::NotUrl(_)
        ));
        assert_eq!(
            problem("https://a.example/?x=1", false),
            UrlProblem::QueryOrFragment
        );
        assert_eq!(check_http_url("https://a.example/?x=1", true), Ok(()));
        assert_eq!(problem("https://a.example/#x", true), UrlProblem::Fragment);
        assert_eq!(
            UrlProblem::QueryOrFragment.to_string(),
            "it must not have a ?query or #fragment"
        );
    }

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
