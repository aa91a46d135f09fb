//! Who is on the other end of a connection, as the OS says — never as the client says. On Linux the
//! executable comes from `/proc/<pid>/exe` and is hashed by reading that same link, so the hash is of the
//! program actually running even if the file on disk was since replaced. On macOS it comes from
//! `proc_pidpath` (libproc) and the file at that path is hashed (a replaced file would be hashed as
//! replaced: see docs/security.md). Hashes are cached by the file's identity (device, inode, size,
//! modification and change times on Unix; path, size, creation and last-write times on Windows) so a
//! busy client is hashed once. On Windows the path comes from `QueryFullProcessImageNameW` on a handle
//! to the process (cis2-os), held open by the pipe server from before the process's creation time is
//! checked until it is hashed, so a reused process id is never mistaken for the client; the file at
//! that path is hashed.
//!
//! A program is named only when the file at the path the OS reports is the very file that runs (same
//! device and inode): a deleted or replaced executable is unidentified, and a file really called
//! `x (deleted)` keeps its name. A connection remembers its process's identity (executable inode and
//! process start time) so the server can notice a program that starts another one (`exec`) on a
//! connection it already has.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;

/// What the agent knows of a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
    /// The executable's path, as the OS reports it.
    pub exe: Option<PathBuf>,
    /// SHA-256 (lower-case hex) of the executable's contents.
    pub sha256: Option<String>,
    /// The process as it was when identified; `None` where the OS gives no way to tell.
    pub process: Option<ProcessIdentity>,
    /// The executable is an interpreter (python, node, java, …): it runs whatever script it is given,
    /// so its identity says little about the program.
    pub interpreter: bool,
    /// An interpreter's script, from its command line (Linux): the first argument that is not an
    /// option, an existing file. Weaker than the executable's identity: the process itself wrote its
    /// command line and chose what to load.
    pub script: Option<PathBuf>,
    /// SHA-256 of that script file.
    pub script_sha256: Option<String>,
}

/// What makes a running process the same program over time: the executable file behind it (device,
/// inode) and when the process started (a reused pid has another start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    exe_dev: u64,
    exe_ino: u64,
    start_ticks: u64,
}

/// The process's identity now, or `None` when it is gone or the OS gives no way to tell.
pub fn process_identity(pid: i32) -> Option<ProcessIdentity> {
    ProcessHold::open(pid).identity()
}

/// A hold on one process through which it can be asked about again cheaply. On Linux: its
/// `/proc/<pid>` folder, opened once; it keeps naming that process, not its pid (once the process is
/// gone, lookups through it fail, even if the pid has been given to another process). Elsewhere it
/// holds nothing and tells nothing.
#[derive(Debug, Default)]
pub struct ProcessHold {
    #[cfg(target_os = "linux")]
    dir: Option<std::os::fd::OwnedFd>,
}

impl ProcessHold {
    #[cfg(target_os = "linux")]
    pub fn open(pid: i32) -> ProcessHold {
        use rustix::fs::{Mode, OFlags};
        let dir = (pid > 0)
            .then(|| {
                rustix::fs::open(
                    format!("/proc/{pid}"),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()
            })
            .flatten();
        ProcessHold { dir }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn open(_pid: i32) -> ProcessHold {
        ProcessHold {}
    }

    /// The held process's identity now, or `None` when it is gone or the OS gives no way to tell.
    #[cfg(target_os = "linux")]
    pub fn identity(&self) -> Option<ProcessIdentity> {
        use rustix::fs::{Mode, OFlags};
        use std::io::Read;
        let dir = self.dir.as_ref()?;
        let (exe_dev, exe_ino) = self.executable()?;
        let stat = rustix::fs::openat(dir, "stat", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .ok()?;
        let mut text = String::new();
        std::fs::File::from(stat).read_to_string(&mut text).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so count from the last `)`;
        // starttime is field 22, the 20th after comm.
        let after_comm = &text[text.rfind(')')? + 1..];
        let start_ticks = after_comm.split_whitespace().nth(19)?.parse().ok()?;
        Some(ProcessIdentity {
            exe_dev,
            exe_ino,
            start_ticks,
        })
    }

    #[cfg(not(target_os = "linux"))]
    pub fn identity(&self) -> Option<ProcessIdentity> {
        None
    }

    /// Whether the held process still runs the program `identified` names: it is still there (the hold
    /// is on the process, so a reused pid cannot pass for it, and its start time need not be read
    /// again) and its executable is the same file (an `exec` of another program changes it). One
    /// `stat`, so it can be asked at every request.
    #[cfg(target_os = "linux")]
    pub fn still_runs(&self, identified: &ProcessIdentity) -> bool {
        self.executable() == Some((identified.exe_dev, identified.exe_ino))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn still_runs(&self, _identified: &ProcessIdentity) -> bool {
        false
    }

    /// Device and inode of the file the held process runs.
    #[cfg(target_os = "linux")]
    #[allow(clippy::unnecessary_cast)] // their types differ between architectures
    fn executable(&self) -> Option<(u64, u64)> {
        let stat =
            rustix::fs::statat(self.dir.as_ref()?, "exe", rustix::fs::AtFlags::empty()).ok()?;
        Some((stat.st_dev as u64, stat.st_ino as u64))
    }
}

/// Executable names (before any version suffix: `python3.11` is `python`) that run a script named on
/// their command line.
const INTERPRETERS: [&str; 14] = [
    "python", "node", "nodejs", "ruby", "perl", "php", "java", "dotnet", "bash", "sh", "dash",
    "zsh", "pwsh", "deno",
];

/// Whether the executable at `exe` is an interpreter by its name (`python3.11`, `node`, `java`).
pub fn is_interpreter(exe: &std::path::Path) -> bool {
    let Some(name) = exe.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let stem = name
        .strip_suffix(".exe")
        .unwrap_or(name)
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    INTERPRETERS.contains(&stem)
}

/// Options after which an interpreter runs code from the command line itself, not from a script
/// file: a command line with one of them names no script.
const CODE_OPTIONS: [&str; 9] = [
    "-c",
    "-e",
    "-m",
    "-p",
    "-r",
    "-i",
    "--eval",
    "--print",
    "--require",
];

/// The script an interpreter's command line names: the first argument after the interpreter that is
/// not an option (`java -jar X`: `X`), resolved against the process's folder, if it is a file. `None`
/// when an option says the code comes from elsewhere (`python3 -c …`, `node -e …`).
pub fn script_of(args: &[std::ffi::OsString], cwd: &std::path::Path) -> Option<PathBuf> {
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        if CODE_OPTIONS.contains(&text.as_ref()) || text == "-" {
            return None;
        }
        if text == "-jar" {
            return rest.next().map(|jar| cwd.join(jar));
        }
        if text.starts_with('-') {
            continue;
        }
        let path = cwd.join(arg);
        return std::fs::metadata(&path)
            .is_ok_and(|m| m.is_file())
            .then_some(path);
    }
    None
}

impl Peer {
    pub fn describe(&self) -> String {
        match &self.exe {
            Some(exe) if self.script.is_some() => format!(
                "{} running {} (pid {})",
                exe.display(),
                self.script.as_deref().unwrap_or(exe).display(),
                self.pid.unwrap_or(0)
            ),
            Some(exe) => format!("{} (pid {})", exe.display(), self.pid.unwrap_or(0)),
            None => format!("an unidentified program (pid {})", self.pid.unwrap_or(0)),
        }
    }

    /// The executable's file name, as people call the program (`ward-ehr`).
    pub fn program_name(&self) -> Option<String> {
        self.exe
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }
}

/// A file's identity for the hash cache: device, inode, size, modification time and change time
/// (seconds, nanoseconds). The change time cannot be set back by the file's owner, so a file rewritten
/// in place with its old modification time restored (`touch -r`) is hashed again.
#[cfg(unix)]
type FileKey = (u64, u64, u64, i64, i64, i64, i64);
/// A file's identity on Windows: path, size, creation and last-write times.
#[cfg(windows)]
type FileKey = (PathBuf, u64, u64, u64);

#[cfg(any(target_os = "linux", target_os = "macos"))]
fn file_key(meta: &std::fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

#[derive(Default)]
pub struct Identifier {
    /// The file identity (as [`key_text`]) → SHA-256.
    cache: Mutex<HashMap<String, String>>,
    /// Where the cache is kept across restarts, when it is.
    saved: Option<SavedHashes>,
}

/// The hash cache on disk (`exe-hashes.json` in the data folder), so that a 100 MB interpreter is
/// hashed once per install rather than once per agent start. An entry is only ever used for a file
/// whose whole identity (the [`FileKey`]) is the one recorded; the file is ignored unless it is this
/// user's, writable by nobody else, well-formed, and — with a seal key (the keychain store) — sealed
/// by this agent's key.
struct SavedHashes {
    path: PathBuf,
    seal: Option<crate::audit::SealKey>,
    /// One writer at a time: two would share the temporary file.
    writing: Mutex<()>,
}

/// The most entries kept: one per executable version seen, so old ones are dropped past this.
const MAX_SAVED_HASHES: usize = 4096;
const SEAL_PURPOSE: &str = "executable hash cache";

#[derive(serde::Serialize, serde::Deserialize)]
struct HashFile {
    format: u32,
    /// The file identity (as text) → SHA-256 (lower-case hex).
    entries: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<String>,
}

fn key_text(key: &FileKey) -> String {
    format!("{key:?}")
}

impl SavedHashes {
    fn entries_bytes(entries: &std::collections::BTreeMap<String, String>) -> Vec<u8> {
        serde_json::to_vec(entries).unwrap_or_default()
    }

    /// The entries of the file, or none when it cannot be trusted (with why, for the log).
    fn load(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(e.to_string()),
        };
        if !meta.is_file() {
            return Err("it is not a plain file".into());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if meta.uid() != rustix::process::geteuid().as_raw() {
                return Err(format!(
                    "it belongs to uid {}, not to this user",
                    meta.uid()
                ));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "other users may write it (mode {:o})",
                    meta.mode() & 0o777
                ));
            }
        }
        let text = std::fs::read(&self.path).map_err(|e| e.to_string())?;
        let file: HashFile =
            serde_json::from_slice(&text).map_err(|e| format!("not valid: {e}"))?;
        if file.format != 1 {
            return Err(format!("format {} is not this agent's", file.format));
        }
        if let Some(seal) = &self.seal {
            let bytes = Self::entries_bytes(&file.entries);
            if !file
                .seal
                .as_deref()
                .is_some_and(|tag| seal.verifies_tag(SEAL_PURPOSE, &bytes, tag))
            {
                return Err("it is not sealed by this agent's key".into());
            }
        }
        let is_hash = |h: &String| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        Ok(file
            .entries
            .into_iter()
            .filter(|(_, hash)| is_hash(hash))
            .take(MAX_SAVED_HASHES)
            .collect())
    }

    /// Writes `entries` atomically, mode 0600.
    fn save(&self, entries: std::collections::BTreeMap<String, String>) -> std::io::Result<()> {
        let seal = self
            .seal
            .as_ref()
            .map(|key| key.tag(SEAL_PURPOSE, &Self::entries_bytes(&entries)));
        let text = serde_json::to_vec(&HashFile {
            format: 1,
            entries,
            seal,
        })
        .map_err(std::io::Error::other)?;
        let _one_writer = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        crate::store::write_atomically(&self.path, &text)
    }
}

impl Identifier {
    /// An identifier whose hashes are kept in `path` across restarts (sealed with `seal` when given);
    /// what the file holds now is loaded, or ignored with a warning when it cannot be trusted.
    pub fn persistent(path: PathBuf, seal: Option<crate::audit::SealKey>) -> Identifier {
        let saved = SavedHashes {
            path,
            seal,
            writing: Mutex::new(()),
        };
        let loaded = saved.load().unwrap_or_else(|why| {
            tracing::warn!(
                file = %saved.path.display(),
                %why,
                "the saved executable hashes are ignored; programs are hashed again"
            );
            Default::default()
        });
        Identifier {
            cache: Mutex::new(loaded.into_iter().collect()),
            saved: Some(saved),
        }
    }

    fn cached(&self, key: &FileKey) -> Option<String> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key_text(key))
            .cloned()
    }

    /// Remembers a new hash, and saves the cache when it is kept across restarts.
    fn remember(&self, key: &FileKey, hash: &str) {
        let entries = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_SAVED_HASHES {
                // Which entry goes does not matter: a dropped one is hashed again when next met.
                if let Some(old) = cache.keys().next().cloned() {
                    cache.remove(&old);
                }
            }
            cache.insert(key_text(key), hash.to_string());
            self.saved.as_ref().map(|_| {
                cache
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
        };
        if let (Some(saved), Some(entries)) = (&self.saved, entries)
            && let Err(e) = saved.save(entries)
        {
            tracing::warn!(error = %e, "the executable hashes could not be saved; they are hashed again after a restart");
        }
    }

    pub fn identify(&self, uid: u32, pid: Option<i32>) -> Peer {
        let mut peer = Peer {
            uid,
            pid,
            ..Peer::default()
        };
        if let Some(pid) = pid.filter(|p| *p > 0) {
            peer.process = process_identity(pid);
            let (exe, sha256) = self.executable(pid);
            peer.exe = exe;
            peer.sha256 = sha256;
            self.add_script(&mut peer, pid, true);
        }
        peer
    }

    /// For an interpreter: its script and, `may_hash` or when cached, the script's hash.
    fn add_script(&self, peer: &mut Peer, pid: i32, may_hash: bool) {
        peer.interpreter = peer.exe.as_deref().is_some_and(is_interpreter);
        if !peer.interpreter {
            return;
        }
        peer.script = command_line_script(pid);
        peer.script_sha256 = peer.script.as_deref().and_then(|script| {
            let key = script_key(script)?;
            if let Some(hash) = self.cached(&key) {
                return Some(hash);
            }
            if !may_hash {
                return None;
            }
            let hash = file_sha256(script).ok()?;
            // Cached only if the file is still the one whose identity was taken.
            if script_key(script).as_ref() == Some(&key) {
                self.remember(&key, &hash);
            }
            Some(hash)
        });
    }

    /// Like [`identify`](Self::identify), but only when the executable's hash is cached: no file read.
    pub fn identify_cached(&self, uid: u32, pid: Option<i32>) -> Option<Peer> {
        let pid_value = pid.filter(|p| *p > 0)?;
        let process = process_identity(pid_value);
        let (exe, key) = exe_and_key(pid_value)?;
        exe.as_ref()?;
        let sha256 = self.cached(&key)?;
        let mut peer = Peer {
            uid,
            pid,
            exe,
            sha256: Some(sha256),
            process,
            ..Peer::default()
        };
        self.add_script(&mut peer, pid_value, false);
        // A script not hashed yet: the slow path hashes it.
        if peer.script.is_some() && peer.script_sha256.is_none() {
            return None;
        }
        Some(peer)
    }

    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    fn executable(&self, pid: i32) -> (Option<PathBuf>, Option<String>) {
        let Some((Some(exe), key)) = exe_and_key(pid) else {
            return (None, None);
        };
        let exe = Some(exe);
        if let Some(hash) = self.cached(&key) {
            return (exe, Some(hash));
        }
        let Some(image) = running_image(pid, exe.as_deref()) else {
            return (exe, None);
        };
        match file_sha256(&image) {
            Ok(hash) => {
                self.remember(&key, &hash);
                (exe, Some(hash))
            }
            Err(_) => (exe, None),
        }
    }

    /// Other systems: no way this crate knows yet; the peer stays unidentified and only policies that
    /// allow unidentified programs (client_policy = "allow") let it in. See docs/security.md.
    #[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
    fn executable(&self, _pid: i32) -> (Option<PathBuf>, Option<String>) {
        (None, None)
    }
}

/// The executable's path and its file identity (for the hash cache), from `/proc/<pid>/exe`. The path
/// is `None` unless the file there is the one running: the kernel appends " (deleted)" to the link of a
/// deleted file, which a file can also be named, so only the inode tells.
#[cfg(target_os = "linux")]
fn exe_and_key(pid: i32) -> Option<(Option<PathBuf>, FileKey)> {
    use std::os::unix::fs::MetadataExt;
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let running = std::fs::metadata(&link).ok()?;
    let exe = std::fs::read_link(&link).ok().filter(|path| {
        std::fs::metadata(path)
            .is_ok_and(|named| named.dev() == running.dev() && named.ino() == running.ino())
    });
    Some((exe, file_key(&running)))
}

/// What to hash: on Linux `/proc/<pid>/exe`, which reads the program that is running even if the file
/// at its path has since been replaced.
#[cfg(target_os = "linux")]
fn running_image(pid: i32, _exe: Option<&std::path::Path>) -> Option<PathBuf> {
    Some(PathBuf::from(format!("/proc/{pid}/exe")))
}

/// On macOS, the file at the path `proc_pidpath` gave.
#[cfg(target_os = "macos")]
fn running_image(_pid: i32, exe: Option<&std::path::Path>) -> Option<PathBuf> {
    exe.map(std::path::Path::to_path_buf)
}

/// The executable's path (`proc_pidpath`) and its file identity (for the hash cache).
#[cfg(target_os = "macos")]
fn exe_and_key(pid: i32) -> Option<(Option<PathBuf>, FileKey)> {
    let path = PathBuf::from(libproc::proc_pid::pidpath(pid).ok()?);
    let meta = std::fs::metadata(&path).ok()?;
    Some((Some(path), file_key(&meta)))
}

/// The executable's path (`QueryFullProcessImageNameW` through a process handle) and its file identity.
/// The caller holds the process open (ipc::pipe), so `pid` is the process that connected.
#[cfg(windows)]
fn exe_and_key(pid: i32) -> Option<(Option<PathBuf>, FileKey)> {
    use std::os::windows::fs::MetadataExt;
    let process = cis2_os::Process::open(u32::try_from(pid).ok()?).ok()?;
    let path = process.image_path().ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let key = (
        path.clone(),
        meta.file_size(),
        meta.creation_time(),
        meta.last_write_time(),
    );
    Some((Some(path), key))
}

/// On Windows, the file at the image path: a running program's file cannot be written while it runs
/// (it can be renamed away; see docs/security.md).
#[cfg(windows)]
fn running_image(_pid: i32, exe: Option<&std::path::Path>) -> Option<PathBuf> {
    exe.map(std::path::Path::to_path_buf)
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
fn exe_and_key(_pid: i32) -> Option<(Option<PathBuf>, FileKey)> {
    None
}

/// The script named on process `pid`'s command line (Linux: `/proc/<pid>/cmdline`, relative to
/// `/proc/<pid>/cwd`).
#[cfg(target_os = "linux")]
fn command_line_script(pid: i32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let args: Vec<std::ffi::OsString> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| std::ffi::OsString::from_vec(a.to_vec()))
        .collect();
    script_of(&args, &cwd)
}

/// Elsewhere the command line is not read: interpreters' scripts stay unknown (rules on a script
/// match nothing there).
#[cfg(not(target_os = "linux"))]
fn command_line_script(_pid: i32) -> Option<PathBuf> {
    None
}

/// A script file's identity for the hash cache.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn script_key(path: &std::path::Path) -> Option<FileKey> {
    std::fs::metadata(path).ok().map(|m| file_key(&m))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn script_key(_path: &std::path::Path) -> Option<FileKey> {
    None
}

/// The SHA-256 of a file (what an admin writes into `[[clients]] sha256`).
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_os = "linux")]
    use std::path::Path;
    #[cfg(target_os = "linux")]
    use std::process::{Child, Command};

    #[test]
    #[cfg(any(target_os = "linux", windows))]
    fn identifies_this_very_process() {
        let peer = Identifier::default().identify(0, Some(std::process::id() as i32));
        let exe = std::env::current_exe().unwrap();
        assert_eq!(peer.exe.as_deref(), Some(exe.as_path()));
        assert_eq!(peer.sha256.unwrap(), file_sha256(&exe).unwrap());
        assert_eq!(peer.process, process_identity(std::process::id() as i32));
        // Linux records the process identity for the per-request re-check; Windows has none to record
        // (the pipe server holds the process handle instead, and there is no `exec`).
        assert_eq!(peer.process.is_some(), cfg!(target_os = "linux"));
    }

    /// A copy of `sleep` at `path`, running. A freshly written executable can be "busy" for a moment
    /// while another test thread forks with the file still open, hence the retries.
    #[cfg(target_os = "linux")]
    fn run_copy_of_sleep(path: &Path) -> Child {
        use std::os::unix::fs::PermissionsExt;
        if !path.exists() {
            std::fs::copy("/bin/sleep", path).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for _ in 0..100 {
            match Command::new(path).arg("60").spawn() {
                Ok(child) => return child,
                Err(e) if e.raw_os_error() == Some(26) => std::thread::yield_now(),
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
        panic!("{} stayed busy", path.display())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_file_named_deleted_keeps_its_name_and_a_deleted_executable_is_unidentified() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("fake (deleted)");
        let mut child = run_copy_of_sleep(&named);
        let peer = Identifier::default().identify(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            peer.exe.as_deref(),
            Some(named.as_path()),
            "never stripped by text"
        );

        let gone = dir.path().join("gone");
        let mut child = run_copy_of_sleep(&gone);
        std::fs::remove_file(&gone).unwrap();
        // A file put where the deleted one was is not the program that runs either.
        std::fs::copy("/bin/sleep", &gone).unwrap();
        let peer = Identifier::default().identify(0, Some(child.id() as i32));
        std::fs::remove_file(&gone).unwrap();
        let deleted = Identifier::default().identify(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        for peer in [peer, deleted] {
            assert_eq!(peer.exe, None, "{peer:?}");
            assert_eq!(peer.sha256, None, "{peer:?}");
            assert!(peer.describe().starts_with("an unidentified program"));
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn hashes_survive_a_restart_and_an_untrusted_cache_file_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("exe-hashes.json");
        let seal = crate::audit::SealKey::derived_from(b"the keychain's key");
        let me = Some(std::process::id() as i32);
        let first = Identifier::persistent(cache.clone(), Some(seal.clone()));
        assert!(first.identify_cached(0, me).is_none(), "nothing known yet");
        let hashed = first.identify(0, me);
        assert!(hashed.sha256.is_some());
        assert_eq!(
            std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A restarted agent knows the hash without reading the executable.
        let restarted = Identifier::persistent(cache.clone(), Some(seal.clone()));
        assert_eq!(restarted.identify_cached(0, me), Some(hashed.clone()));

        // Sealed by another key (or not sealed at all): not this agent's file.
        let other_key = crate::audit::SealKey::derived_from(b"another agent");
        assert!(
            Identifier::persistent(cache.clone(), Some(other_key))
                .identify_cached(0, me)
                .is_none()
        );
        // Unsealed stores (no keychain) trust the file as they trust the data folder.
        let unsealed = Identifier::persistent(dir.path().join("plain.json"), None);
        unsealed.identify(0, me);
        assert!(
            Identifier::persistent(dir.path().join("plain.json"), None)
                .identify_cached(0, me)
                .is_some()
        );
        assert!(
            Identifier::persistent(dir.path().join("plain.json"), Some(seal.clone()))
                .identify_cached(0, me)
                .is_none(),
            "a sealing agent does not take an unsealed file"
        );
        // Writable by others: ignored.
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            Identifier::persistent(cache.clone(), Some(seal.clone()))
                .identify_cached(0, me)
                .is_none()
        );
        // Corrupt: ignored, and the next hash writes a good file again.
        std::fs::write(&cache, b"{not json").unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o600)).unwrap();
        let fresh = Identifier::persistent(cache.clone(), Some(seal.clone()));
        assert!(fresh.identify_cached(0, me).is_none());
        assert_eq!(fresh.identify(0, me).sha256, hashed.sha256);
        assert!(
            Identifier::persistent(cache.clone(), Some(seal))
                .identify_cached(0, me)
                .is_some()
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_saved_hash_is_used_only_for_the_very_file_it_was_taken_of() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("exe-hashes.json");
        let path = dir.path().join("prog");
        let mut child = run_copy_of_sleep(&path);
        let before =
            Identifier::persistent(cache.clone(), None).identify(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(before.sha256.is_some());
        // Another file at the same path (a new inode and change time): the saved hash is not its.
        std::fs::remove_file(&path).unwrap();
        let mut child = run_copy_of_sleep(&path);
        let after = Identifier::persistent(cache, None);
        let cached = after.identify_cached(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(cached, None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_file_rewritten_in_place_with_its_time_restored_is_hashed_again() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog");
        let identifier = Identifier::default();
        let mut child = run_copy_of_sleep(&path);
        let before = identifier.identify(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(before.sha256, Some(file_sha256(&path).unwrap()));

        // Same inode, same size, the old modification time put back: only the change time differs.
        // The last byte of `sleep` is in its section headers, which running it never reads.
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let end = file.seek(SeekFrom::End(-1)).unwrap();
        let mut last = [0u8];
        std::io::Read::read_exact(&mut file, &mut last).unwrap();
        file.seek(SeekFrom::Start(end)).unwrap();
        file.write_all(&[last[0] ^ 0xff]).unwrap();
        file.set_modified(modified).unwrap();
        drop(file);
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );

        let mut child = run_copy_of_sleep(&path);
        let after = identifier.identify(0, Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(after.sha256, Some(file_sha256(&path).unwrap()));
        assert_ne!(
            after.sha256, before.sha256,
            "the old hash was not served from the cache"
        );
    }
}
