//! Which programs may use the agent, and for what. Programs are identified by the OS (path and SHA-256
//! of the executable, see [`crate::peer`]); a name a client gives itself is never trusted.
//!
//! Order: the first `[[clients]]` rule that matches; else a remembered decision for the executable's
//! hash; else `[agent] client_policy` — `allow`, `deny`, or `ask` (a person decides through the
//! desktop app's prompt; `cis2-agentd` has no one to ask and refuses, naming the setting that allows it).
//! `status` is always answered: it is how a program learns that an agent is there at all.

use crate::config::{ClientPolicy, ClientRule, Config};
use crate::peer::Peer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Methods answered for every program of this user, whatever the policy: they tell nothing about the
/// clinician (`status` withholds the user from programs that may not call `whoami`).
pub const OPEN_METHODS: [&str; 2] = ["status", "version"];

/// What a person decided for a program (the desktop app's prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    AllowOnce,
    AlwaysAllow,
    Deny,
}

/// Who answers `ask`. The desktop app implements it; `cis2-agentd` has none.
#[async_trait::async_trait]
pub trait Approver: Send + Sync {
    async fn ask(&self, peer: &Peer) -> Answer;
}

/// A remembered decision, kept in `<data_dir>/clients.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Short id for `cis2ctl clients revoke ID`: the first 12 hex digits of the hash.
    pub id: String,
    pub path: Option<String>,
    pub sha256: String,
    pub allow: bool,
    /// RFC 3339.
    pub decided_at: String,
}

/// The remembered decisions file. Re-read when it changes, so `cis2ctl clients revoke` takes effect
/// at once in a running agent.
pub struct Decisions {
    path: PathBuf,
    cache: Mutex<(Option<std::time::SystemTime>, Vec<Remembered>)>,
}

impl Decisions {
    pub fn new(path: PathBuf) -> Decisions {
        Decisions {
            path,
            cache: Mutex::new((None, Vec::new())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn list(&self) -> Vec<Remembered> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Unchanged (or still absent): the cached list stands.
        if cache.0 != modified {
            cache.1 = load(&self.path);
            cache.0 = modified;
        }
        cache.1.clone()
    }

    pub fn remember(&self, peer: &Peer, allow: bool) -> std::io::Result<()> {
        let Some(sha256) = &peer.sha256 else {
            return Ok(());
        };
        let mut all = load(&self.path);
        all.retain(|r| &r.sha256 != sha256);
        all.push(Remembered {
            id: sha256[..12].to_string(),
            path: peer.exe.as_ref().map(|p| p.display().to_string()),
            sha256: sha256.clone(),
            allow,
            decided_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        save(&self.path, &all)
    }
}

fn load(path: &Path) -> Vec<Remembered> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Writes the decisions atomically (temp file + rename), owner-only.
pub fn save(path: &Path, all: &[Remembered]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(all).map_err(std::io::Error::other)?,
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(tmp, path)
}

/// Removes the remembered decision whose id (or full hash) is `id`; whether there was one.
pub fn revoke(path: &Path, id: &str) -> std::io::Result<bool> {
    let mut all = load(path);
    let before = all.len();
    all.retain(|r| r.id != id && r.sha256 != id);
    if all.len() == before {
        return Ok(false);
    }
    save(path, &all)?;
    Ok(true)
}

/// What a connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed(Grant),
    /// Nobody has decided; the approver (if any) must be asked.
    Ask,
    Denied(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Where the permission came from, for the audit log and messages.
    pub source: String,
    pub methods: Vec<String>,
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
}

impl Grant {
    pub fn everything(source: &str) -> Grant {
        Grant {
            source: source.into(),
            methods: crate::config::CLIENT_METHODS
                .iter()
                .map(|m| m.to_string())
                .collect(),
            audiences: Vec::new(),
            scopes: Vec::new(),
        }
    }

    pub fn permits(&self, method: &str) -> bool {
        OPEN_METHODS.contains(&method) || self.methods.iter().any(|m| m == method)
    }
}

fn rule_matches(rule: &ClientRule, peer: &Peer) -> bool {
    let path_ok = rule.path.as_ref().is_none_or(|p| {
        peer.exe
            .as_deref()
            .is_some_and(|exe| same_path(p, exe, cfg!(windows)))
    });
    let hash_ok = rule
        .sha256
        .as_ref()
        .is_none_or(|h| peer.sha256.as_deref() == Some(h.as_str()));
    // A rule on a script also needs the interpreter to be one (and the script to be that file):
    // weaker than an executable's identity, and documented as such (docs/security.md).
    let script_ok = rule
        .script
        .as_ref()
        .is_none_or(|p| peer.interpreter && peer.script.as_deref() == Some(p.as_path()));
    let script_hash_ok = rule
        .script_sha256
        .as_ref()
        .is_none_or(|h| peer.interpreter && peer.script_sha256.as_deref() == Some(h.as_str()));
    (rule.path.is_some() || rule.sha256.is_some())
        && path_ok
        && hash_ok
        && script_ok
        && script_hash_ok
}

/// Whether the running program's path is the one a rule lists. Windows file names are not
/// case-sensitive, and an admin may write the path with `/` or with the `\\?\` long-path prefix that
/// some tools print, while the OS reports `C:\...` with its own casing: compared as Windows would,
/// `C:\Program Files\EHR\ehr.exe` is every spelling of one file. Elsewhere paths compare exactly.
fn same_path(listed: &Path, running: &Path, windows: bool) -> bool {
    if windows {
        windows_path_key(&listed.to_string_lossy()) == windows_path_key(&running.to_string_lossy())
    } else {
        listed == running
    }
}

/// One spelling of a Windows path: `/` as `\`, repeated separators as one (a UNC path keeps its
/// leading two), no `\\?\` or `\\?\UNC\` prefix, upper case (Windows' own comparison of names).
fn windows_path_key(path: &str) -> String {
    let path = path.replace('/', "\\");
    let path = if let Some(rest) = path.strip_prefix(r"\\?\UNC\") {
        format!(r"\\{rest}")
    } else if let Some(rest) = path.strip_prefix(r"\\?\") {
        rest.to_string()
    } else {
        path
    };
    let (lead, rest) = match path.strip_prefix(r"\\") {
        Some(rest) => (r"\\", rest),
        None => ("", path.as_str()),
    };
    let mut key = String::from(lead);
    for c in rest.chars() {
        if !(c == '\\' && key.ends_with('\\') && key.len() > lead.len()) {
            key.extend(c.to_uppercase());
        }
    }
    key
}

/// Methods a listed client may call when its rule does not say: every method but `logout`.
fn default_methods() -> Vec<String> {
    let all = crate::config::CLIENT_METHODS.iter();
    all.filter(|m| **m != "logout")
        .map(|m| m.to_string())
        .collect()
}

/// Decides for `peer` without asking anyone.
pub fn decide(config: &Config, decisions: &Decisions, peer: &Peer) -> Verdict {
    if let Some(rule) = config.clients.iter().find(|r| rule_matches(r, peer)) {
        return Verdict::Allowed(Grant {
            source: format!("[[clients]] {}", rule.name),
            methods: rule.methods.clone().unwrap_or_else(default_methods),
            audiences: rule.audiences.clone(),
            scopes: rule.scopes.clone(),
        });
    }
    // Remembered decisions answer "ask" only: under "deny" only the admin's [[clients]] let a
    // program in, and a decisions file the user can write must not override that.
    let policy = config.effective_client_policy();
    if policy == ClientPolicy::Ask
        && let Some(sha256) = &peer.sha256
        && let Some(remembered) = decisions.list().into_iter().find(|r| &r.sha256 == sha256)
    {
        return if remembered.allow {
            Verdict::Allowed(Grant {
                source: format!("remembered decision {}", remembered.id),
                ..Grant::everything("")
            })
        } else {
            Verdict::Denied(format!(
                "{} was refused earlier by the person signed in (decision {}; `cis2ctl clients revoke {}` forgets it).",
                peer.describe(),
                remembered.id,
                remembered.id
            ))
        };
    }
    match policy {
        ClientPolicy::Allow => Verdict::Allowed(Grant::everything("client_policy = \"allow\"")),
        ClientPolicy::Deny => Verdict::Denied(format!(
            "{} is not listed in [[clients]] and client_policy is \"deny\".{}",
            peer.describe(),
            how_to_list(config, peer)
        )),
        ClientPolicy::Ask => Verdict::Ask,
    }
}

/// The sentence that tells an admin exactly what to add to allow `peer`.
pub fn how_to_list(config: &Config, peer: &Peer) -> String {
    let file = config
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the config file".into());
    let name = peer.program_name().unwrap_or_else(|| "…".into());
    let mut entry = format!("[[clients]]\nname = \"{name}\"\n");
    if let Some(exe) = &peer.exe {
        entry.push_str(&format!("path = \"{}\"\n", exe.display()));
    }
    if let Some(sha) = &peer.sha256 {
        entry.push_str(&format!("sha256 = \"{sha}\"\n"));
    }
    if let Some(script) = &peer.script {
        entry.push_str(&format!("script = \"{}\"\n", script.display()));
    }
    if let Some(sha) = &peer.script_sha256 {
        entry.push_str(&format!("script_sha256 = \"{sha}\"\n"));
    }
    let warning = if peer.interpreter && peer.script.is_none() {
        " It is an interpreter, which runs whatever it is given, and its command line names no \
         script file: an entry for it lets in everything it runs."
    } else if peer.interpreter {
        " It is an interpreter: the entry names its script too (script, script_sha256), which is \
         weaker than an executable's identity (see docs/security.md)."
    } else {
        ""
    };
    format!(" To allow it, add to {file}:\n{entry}{warning}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        crate::config::parse(text, Path::new("/etc/cis2-agent/config.toml")).unwrap()
    }

    #[test]
    fn a_script_rule_matches_only_that_script_under_that_interpreter() {
        let script_hash = HASH_B;
        let cfg = config(&format!(
            "{}[agent]\nclient_policy = \"deny\"\n[[clients]]\nname = \"Ward script\"\npath = \"/usr/bin/python3.11\"\n\
             script = \"/opt/ward/ward.py\"\nscript_sha256 = \"{script_hash}\"\n",
            base()
        ));
        let d = Decisions::new(PathBuf::from("/nonexistent/clients.json"));
        let mut python = peer("/usr/bin/python3.11", HASH_A);
        python.interpreter = true;
        assert!(
            matches!(decide(&cfg, &d, &python), Verdict::Denied(_)),
            "the interpreter alone is not the script"
        );
        python.script = Some(PathBuf::from("/opt/ward/ward.py"));
        python.script_sha256 = Some(script_hash.into());
        assert!(matches!(decide(&cfg, &d, &python), Verdict::Allowed(_)));
        let mut changed = python.clone();
        changed.script_sha256 = Some(HASH_A.into());
        assert!(matches!(decide(&cfg, &d, &changed), Verdict::Denied(_)));
        let mut elsewhere = python.clone();
        elsewhere.script = Some(PathBuf::from("/tmp/ward.py"));
        assert!(matches!(decide(&cfg, &d, &elsewhere), Verdict::Denied(_)));
        // A native program is never matched by its arguments.
        let mut native = python.clone();
        native.interpreter = false;
        assert!(matches!(decide(&cfg, &d, &native), Verdict::Denied(_)));
        // What to add, for an interpreter with a script, names the script and says it is weaker.
        let told = how_to_list(&cfg, &python);
        assert!(told.contains("script = \"/opt/ward/ward.py\""), "{told}");
        assert!(
            told.contains("weaker than an executable's identity"),
            "{told}"
        );
    }

    fn peer(path: &str, sha: &str) -> Peer {
        Peer {
            uid: 1000,
            pid: Some(42),
            exe: Some(PathBuf::from(path)),
            sha256: Some(sha.into()),
            ..Peer::default()
        }
    }

    const HASH_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const HASH_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn base() -> String {
        "environment = \"custom\"\n[provider]\nissuer = \"https://idp.example/realm\"\nclient_id = \"x\"\n[provider.exchange]\nmethod = \"none\"\n".into()
    }

    #[test]
    fn windows_paths_compare_as_windows_compares_them() {
        let listed = Path::new(r"C:\Program Files\Ward EHR\ehr.exe");
        for running in [
            r"C:\Program Files\Ward EHR\ehr.exe",
            r"c:\program files\ward ehr\EHR.EXE",
            r"\\?\C:\Program Files\Ward EHR\ehr.exe",
            "C:/Program Files/Ward EHR/ehr.exe",
            r"C:\Program Files\\Ward EHR\ehr.exe",
        ] {
            assert!(same_path(listed, Path::new(running), true), "{running}");
        }
        for other in [
            r"C:\Program Files\Ward EHR\ehr2.exe",
            r"D:\Program Files\Ward EHR\ehr.exe",
            r"C:\Program Files\Ward EHR\ehr.exe.bak",
        ] {
            assert!(!same_path(listed, Path::new(other), true), "{other}");
        }
        let share = Path::new(r"\\fileserver\apps\ehr.exe");
        assert!(same_path(
            share,
            Path::new(r"\\?\UNC\FileServer\Apps\ehr.exe"),
            true
        ));
        assert!(!same_path(
            share,
            Path::new(r"\fileserver\apps\ehr.exe"),
            true
        ));
        // Elsewhere case matters: /opt/EHR and /opt/ehr are two files.
        assert!(!same_path(
            Path::new("/opt/ehr/ehr"),
            Path::new("/opt/EHR/ehr"),
            false
        ));
        assert!(same_path(
            Path::new("/opt/ehr/ehr"),
            Path::new("/opt/ehr/ehr"),
            false
        ));
    }

    /// On Windows the whole rule matches with the path as the OS reports it in another case.
    #[cfg(windows)]
    #[test]
    fn a_windows_rule_matches_the_reported_path_in_any_case() {
        let c = config(&format!(
            "{}[agent]\nclient_policy = \"deny\"\n[[clients]]\nname = \"EHR\"\npath = 'C:\\Program Files\\Ward EHR\\ehr.exe'\n",
            base()
        ));
        let d = Decisions::new(PathBuf::from(r"C:\nonexistent\clients.json"));
        assert!(matches!(
            decide(
                &c,
                &d,
                &peer(r"\\?\c:\program files\ward ehr\EHR.exe", HASH_A)
            ),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            decide(
                &c,
                &d,
                &peer(r"c:\program files\ward ehr\other.exe", HASH_A)
            ),
            Verdict::Denied(_)
        ));
    }

    #[test]
    fn rules_match_by_hash_by_path_or_both() {
        let c = config(&format!(
            "{}[agent]\nclient_policy = \"deny\"\n[[clients]]\nname = \"By hash\"\nsha256 = \"{HASH_A}\"\nmethods = [\"token\"]\n\
             [[clients]]\nname = \"By both\"\npath = \"/opt/ehr/bin/ehr\"\nsha256 = \"{HASH_B}\"\n",
            base()
        ));
        let d = Decisions::new(PathBuf::from("/nonexistent/clients.json"));
        // A copy of the same program under another name is the same program.
        match decide(&c, &d, &peer("/tmp/renamed-copy", HASH_A)) {
            Verdict::Allowed(g) => {
                assert!(g.permits("token") && g.permits("status") && !g.permits("whoami"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&c, &d, &peer("/opt/ehr/bin/ehr", HASH_B)),
            Verdict::Allowed(_)
        ));
        // The listed path with modified contents is not the listed program.
        let modified = decide(&c, &d, &peer("/opt/ehr/bin/ehr", "c".repeat(64).as_str()));
        match modified {
            Verdict::Denied(why) => assert!(
                why.contains("sha256 = \"cccc") && why.contains("/etc/cis2-agent/config.toml"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remembered_decisions_apply_by_hash_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&base());
        let d = Decisions::new(dir.path().join("clients.json"));
        let ehr = peer("/opt/ehr", HASH_A);
        assert_eq!(decide(&c, &d, &ehr), Verdict::Ask);
        d.remember(&ehr, true).unwrap();
        assert!(matches!(
            decide(&c, &d, &peer("/elsewhere/ehr-copy", HASH_A)),
            Verdict::Allowed(_)
        ));
        d.remember(&ehr, false).unwrap();
        assert!(matches!(decide(&c, &d, &ehr), Verdict::Denied(_)));
        assert!(revoke(d.path(), &HASH_A[..12]).unwrap());
        assert!(!revoke(d.path(), &HASH_A[..12]).unwrap());
        assert_eq!(decide(&c, &d, &ehr), Verdict::Ask);
    }

    #[test]
    fn the_sandbox_allows_by_default() {
        let d = Decisions::new(PathBuf::from("/nonexistent"));
        assert!(matches!(
            decide(&Config::sandbox(), &d, &peer("/x", HASH_A)),
            Verdict::Allowed(_)
        ));
    }
}
