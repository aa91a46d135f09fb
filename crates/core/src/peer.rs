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
#[cfg(target_os = "linux")]
pub fn process_identity(pid: i32) -> Option<ProcessIdentity> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so count from the last `)`;
    // starttime is field 22, the 20th after comm.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let start_ticks = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    Some(ProcessIdentity {
        exe_dev: exe.dev(),
        exe_ino: exe.ino(),
        start_ticks,
    })
}

/// Elsewhere `None`, so the per-request re-check has nothing to compare. On Windows that loses
/// nothing: the pipe server holds the client's process handle for the whole connection (its pid cannot
/// be reused meanwhile) and a Windows process cannot replace its own image (there is no `exec`).
#[cfg(not(target_os = "linux"))]
pub fn process_identity(_pid: i32) -> Option<ProcessIdentity> {
    None
}

impl Peer {
    pub fn describe(&self) -> String {
        match &self.exe {
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
    cache: Mutex<HashMap<FileKey, String>>,
}

impl Identifier {
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
        }
        peer
    }

    /// Like [`identify`](Self::identify), but only when the executable's hash is cached: no file read.
    pub fn identify_cached(&self, uid: u32, pid: Option<i32>) -> Option<Peer> {
        let pid_value = pid.filter(|p| *p > 0)?;
        let process = process_identity(pid_value);
        let (exe, key) = exe_and_key(pid_value)?;
        exe.as_ref()?;
        let sha256 = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)?
            .clone();
        Some(Peer {
            uid,
            pid,
            exe,
            sha256: Some(sha256),
            process,
        })
    }

    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    fn executable(&self, pid: i32) -> (Option<PathBuf>, Option<String>) {
        let Some((Some(exe), key)) = exe_and_key(pid) else {
            return (None, None);
        };
        let exe = Some(exe);
        if let Some(hash) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return (exe, Some(hash.clone()));
        }
        let Some(image) = running_image(pid, exe.as_deref()) else {
            return (exe, None);
        };
        match file_sha256(&image) {
            Ok(hash) => {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, hash.clone());
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
