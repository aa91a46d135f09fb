//! Who is on the other end of a connection, as the OS says — never as the client says. On Linux the
//! executable comes from `/proc/<pid>/exe` and is hashed by reading that same link, so the hash is of the
//! program actually running even if the file on disk was since replaced. On macOS it comes from
//! `proc_pidpath` (libproc) and the file at that path is hashed (a replaced file would be hashed as
//! replaced: see docs/security.md). Hashes are cached by the file's identity (device, inode, size,
//! modification time) so a busy client is hashed once. On Windows the path comes from
//! `QueryFullProcessImageNameW` on a handle to the process (cis2-os), held open by the pipe server from
//! before the process's creation time is checked until it is hashed, so a reused process id is never
//! mistaken for the client; the file at that path is hashed.

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

/// A file's identity: device, inode, size, modification time (seconds, nanoseconds).
#[cfg(unix)]
type FileKey = (u64, u64, u64, i64, i64);
/// A file's identity on Windows: path, size, creation and last-write times.
#[cfg(windows)]
type FileKey = (PathBuf, u64, u64, u64);

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
            let (exe, sha256) = self.executable(pid);
            peer.exe = exe;
            peer.sha256 = sha256;
        }
        peer
    }

    /// Like [`identify`](Self::identify), but only when the executable's hash is cached: no file read.
    pub fn identify_cached(&self, uid: u32, pid: Option<i32>) -> Option<Peer> {
        let pid_value = pid.filter(|p| *p > 0)?;
        let (exe, key) = exe_and_key(pid_value)?;
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
        })
    }

    #[cfg(any(target_os = "linux", target_os = "macos", windows))]
    fn executable(&self, pid: i32) -> (Option<PathBuf>, Option<String>) {
        let Some((exe, key)) = exe_and_key(pid) else {
            return (None, None);
        };
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

/// The executable's path and its file identity (for the hash cache), from `/proc/<pid>/exe`.
#[cfg(target_os = "linux")]
fn exe_and_key(pid: i32) -> Option<(Option<PathBuf>, FileKey)> {
    use std::os::unix::fs::MetadataExt;
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let meta = std::fs::metadata(&link).ok()?;
    let exe = std::fs::read_link(&link).ok().map(|p| {
        let text = p.to_string_lossy();
        PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text).to_string())
    });
    Some((
        exe,
        (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        ),
    ))
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
    use std::os::unix::fs::MetadataExt;
    let path = PathBuf::from(libproc::proc_pid::pidpath(pid).ok()?);
    let meta = std::fs::metadata(&path).ok()?;
    Some((
        Some(path),
        (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        ),
    ))
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

    #[test]
    #[cfg(any(target_os = "linux", windows))]
    fn identifies_this_very_process() {
        let peer = Identifier::default().identify(0, Some(std::process::id() as i32));
        let exe = std::env::current_exe().unwrap();
        assert_eq!(peer.exe.as_deref(), Some(exe.as_path()));
        assert_eq!(peer.sha256.unwrap(), file_sha256(&exe).unwrap());
    }
}
