//! Win32: processes, SIDs, named pipes. Every `unsafe` block is one call (or one read of what a call
//! just wrote) with its reason beside it; handles and buffers the system allocates are owned by Rust
//! values that free them on drop.

use std::ffi::{OsStr, OsString, c_void};
use std::io;
use std::os::windows::ffi::{OsStrExt, OsStringExt};
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::PathBuf;
use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::{FILETIME, HANDLE, LocalFree};
use windows_sys::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW, ConvertSidToStringSidW,
    ConvertStringSecurityDescriptorToSecurityDescriptorW, GetSecurityInfo, SDDL_REVISION_1,
    SE_KERNEL_OBJECT,
};
use windows_sys::Win32::Security::{
    DACL_SECURITY_INFORMATION, GetTokenInformation, ImpersonateAnonymousToken,
    OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, RevertToSelf, SECURITY_ATTRIBUTES,
    TOKEN_QUERY, TOKEN_USER, TokenUser,
};
use windows_sys::Win32::System::Pipes::{GetNamedPipeClientProcessId, GetNamedPipeServerProcessId};
use windows_sys::Win32::System::Threading::{
    GetCurrentThread, GetExitCodeProcess, GetProcessTimes, OpenProcess, OpenProcessToken,
    PROCESS_NAME_WIN32, PROCESS_QUERY_LIMITED_INFORMATION, QueryFullProcessImageNameW,
};

/// `GetExitCodeProcess`'s answer for a process that has not ended.
const STILL_ACTIVE: u32 = 259;

/// Memory the system allocated with `LocalAlloc` (SID strings, security descriptors); freed on drop.
struct Local(*mut c_void);

impl Drop for Local {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a Win32 call documented to allocate with LocalAlloc, and
            // this value owns it: it is freed once.
            unsafe { LocalFree(self.0) };
        }
    }
}

fn wide(text: &OsStr) -> Vec<u16> {
    text.encode_wide().chain(std::iter::once(0)).collect()
}

/// A NUL-terminated UTF-16 string the system wrote.
fn from_wide_nul(ptr: *const u16) -> String {
    let mut len = 0;
    // SAFETY: `ptr` is a NUL-terminated string the system just returned; reading up to and not past
    // its NUL stays inside it.
    while unsafe { *ptr.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` u16s before the NUL were read above and are initialised.
    let units = unsafe { std::slice::from_raw_parts(ptr, len) };
    String::from_utf16_lossy(units)
}

fn check(ok: i32) -> io::Result<()> {
    if ok == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A FILETIME as one number: 100-nanosecond intervals since 1601-01-01 UTC.
fn ticks(time: FILETIME) -> u64 {
    (u64::from(time.dwHighDateTime) << 32) | u64::from(time.dwLowDateTime)
}

/// Now, in the units of [`Process::creation_time`].
pub fn now_ticks() -> u64 {
    // Seconds from 1601-01-01 to 1970-01-01.
    const EPOCH_DIFFERENCE: u64 = 11_644_473_600;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (since_unix.as_secs() + EPOCH_DIFFERENCE) * 10_000_000
        + u64::from(since_unix.subsec_nanos()) / 100
}

/// Whether this runs under Wine rather than Windows (tests use it to skip, saying so, what only real
/// Windows enforces: DACLs between users, FILE_FLAG_FIRST_PIPE_INSTANCE, session notifications).
pub fn under_wine() -> bool {
    std::path::Path::new(r"C:\windows\system32\winecfg.exe").exists()
}

/// An open process, held by handle: while this value lives its process id cannot be given to another
/// process, so what is read through it (path, creation time, user) is all of one process.
pub struct Process {
    handle: OwnedHandle,
    pid: u32,
}

impl Process {
    /// Opens `pid` with the least right that reads its name, times and token.
    pub fn open(pid: u32) -> io::Result<Process> {
        // SAFETY: plain call; a null result is an error, a non-null one is a handle we now own.
        let raw = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
        if raw.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid process handle just opened, owned by nobody else.
        let handle = unsafe { OwnedHandle::from_raw_handle(raw) };
        Ok(Process { handle, pid })
    }

    /// This process.
    pub fn current() -> io::Result<Process> {
        Process::open(std::process::id())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle()
    }

    /// The executable's full path (`QueryFullProcessImageNameW`, Win32 form `C:\…`).
    pub fn image_path(&self) -> io::Result<PathBuf> {
        let mut buf = vec![0u16; 32 * 1024];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` holds `len` u16s; the call writes at most that many and sets `len` to the
        // number written (without the NUL).
        check(unsafe {
            QueryFullProcessImageNameW(self.raw(), PROCESS_NAME_WIN32, buf.as_mut_ptr(), &mut len)
        })?;
        buf.truncate(len as usize);
        Ok(PathBuf::from(OsString::from_wide(&buf)))
    }

    /// When the process started, in 100-ns ticks since 1601 (compare with [`now_ticks`]).
    pub fn creation_time(&self) -> io::Result<u64> {
        let zero = FILETIME {
            dwLowDateTime: 0,
            dwHighDateTime: 0,
        };
        let (mut created, mut exited, mut kernel, mut user) = (zero, zero, zero, zero);
        // SAFETY: four valid FILETIMEs for the call to fill.
        check(unsafe {
            GetProcessTimes(
                self.raw(),
                &mut created,
                &mut exited,
                &mut kernel,
                &mut user,
            )
        })?;
        Ok(ticks(created))
    }

    /// Whether the process is still running (it may have ended while we hold its handle).
    pub fn is_running(&self) -> io::Result<bool> {
        let mut code = 0u32;
        // SAFETY: `code` is a valid u32 for the call to fill.
        check(unsafe { GetExitCodeProcess(self.raw(), &mut code) })?;
        Ok(code == STILL_ACTIVE)
    }

    /// The SID (`S-1-5-21-…`) of the user the process runs as.
    pub fn user_sid(&self) -> io::Result<String> {
        let mut token: HANDLE = std::ptr::null_mut();
        // SAFETY: `token` receives a handle on success, which we then own.
        check(unsafe { OpenProcessToken(self.raw(), TOKEN_QUERY, &mut token) })?;
        // SAFETY: `token` is the valid token handle just opened, owned by nobody else.
        let token = unsafe { OwnedHandle::from_raw_handle(token) };
        let mut needed = 0u32;
        // SAFETY: asking for the size only: a null buffer of length 0 (the call fails and sets `needed`).
        unsafe {
            GetTokenInformation(
                token.as_raw_handle(),
                TokenUser,
                std::ptr::null_mut(),
                0,
                &mut needed,
            )
        };
        if needed == 0 {
            return Err(io::Error::last_os_error());
        }
        // u64s keep the buffer aligned for TOKEN_USER.
        let mut buf = vec![0u64; (needed as usize).div_ceil(8)];
        // SAFETY: `buf` has room for `needed` bytes.
        check(unsafe {
            GetTokenInformation(
                token.as_raw_handle(),
                TokenUser,
                buf.as_mut_ptr().cast(),
                needed,
                &mut needed,
            )
        })?;
        // SAFETY: the call filled `buf` with a TOKEN_USER (aligned: `buf` is u64s), whose SID points
        // into `buf`, which lives until the end of this function.
        let sid = unsafe { (*buf.as_ptr().cast::<TOKEN_USER>()).User.Sid };
        let mut text: *mut u16 = std::ptr::null_mut();
        // SAFETY: `sid` is valid (above); `text` receives a LocalAlloc'd string we then own.
        check(unsafe { ConvertSidToStringSidW(sid, &mut text) })?;
        let text = Local(text.cast());
        Ok(from_wide_nul(text.0.cast()))
    }
}

/// The SID of the user this process runs as.
pub fn current_user_sid() -> io::Result<String> {
    Process::current()?.user_sid()
}

/// The process id of the client at the other end of a connected named-pipe server handle.
pub fn pipe_client_pid(pipe: &impl AsRawHandle) -> io::Result<u32> {
    let mut pid = 0u32;
    // SAFETY: `pipe` is a live pipe handle (borrowed for the call); `pid` is a valid u32.
    check(unsafe { GetNamedPipeClientProcessId(pipe.as_raw_handle(), &mut pid) })?;
    Ok(pid)
}

/// The process id of the server of a connected named-pipe client handle.
pub fn pipe_server_pid(pipe: &impl AsRawHandle) -> io::Result<u32> {
    let mut pid = 0u32;
    // SAFETY: `pipe` is a live pipe handle (borrowed for the call); `pid` is a valid u32.
    check(unsafe { GetNamedPipeServerProcessId(pipe.as_raw_handle(), &mut pid) })?;
    Ok(pid)
}

/// Creates an instance of the named pipe `name` (`\\.\pipe\…`) whose security descriptor is `sddl`,
/// refusing remote clients. With `first`, the call fails (access denied) when any process already
/// holds an instance of that name: a squatter cannot have created it first and receive our clients.
pub fn create_pipe_server(name: &OsStr, sddl: &str, first: bool) -> io::Result<NamedPipeServer> {
    let text = wide(OsStr::new(sddl));
    let mut descriptor: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated UTF-16; `descriptor` receives a LocalAlloc'd descriptor, owned
    // below by `Local`.
    check(unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            text.as_ptr(),
            SDDL_REVISION_1,
            &mut descriptor,
            std::ptr::null_mut(),
        )
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the pipe's security descriptor {sddl:?}: {e}"),
        )
    })?;
    let descriptor = Local(descriptor);
    let mut attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: descriptor.0,
        bInheritHandle: 0,
    };
    let mut options = ServerOptions::new();
    options
        .first_pipe_instance(first)
        .reject_remote_clients(true);
    // SAFETY: `attributes` is a valid SECURITY_ATTRIBUTES whose descriptor lives (in `descriptor`)
    // until after this call; CreateNamedPipeW copies it into the new object.
    unsafe {
        options.create_with_security_attributes_raw(name, (&raw mut attributes).cast::<c_void>())
    }
}

/// The owner and DACL of a kernel object (a pipe, a process), as SDDL.
pub fn security_sddl(handle: &impl AsRawHandle) -> io::Result<String> {
    let mut descriptor: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    let what = OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION;
    // SAFETY: `handle` is live for the call; the out pointers we do not want are null; `descriptor`
    // receives a LocalAlloc'd descriptor, owned below by `Local`.
    let status = unsafe {
        GetSecurityInfo(
            handle.as_raw_handle(),
            SE_KERNEL_OBJECT,
            what,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut descriptor,
        )
    };
    if status != 0 {
        return Err(io::Error::from_raw_os_error(status as i32));
    }
    let descriptor = Local(descriptor);
    let mut text: *mut u16 = std::ptr::null_mut();
    // SAFETY: `descriptor` is valid (above); `text` receives a LocalAlloc'd string we then own.
    check(unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            descriptor.0,
            SDDL_REVISION_1,
            what,
            &mut text,
            std::ptr::null_mut(),
        )
    })?;
    let text = Local(text.cast());
    Ok(from_wide_nul(text.0.cast()))
}

/// Runs `f` on this thread as the anonymous user, then as this process's user again: how a test on
/// one machine asks "would another user be let in?" of a DACL without a second account.
pub fn as_anonymous<T>(f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: the pseudo-handle of the calling thread, which needs no closing.
    check(unsafe { ImpersonateAnonymousToken(GetCurrentThread()) })?;
    let result = f();
    // SAFETY: ends this thread's impersonation; no arguments.
    check(unsafe { RevertToSelf() })?;
    Ok(result)
}

/// Shows `text` in a message box with an error icon and an OK button, above other windows, and
/// returns when the person closes it. How the desktop app says it could not start: a Windows GUI
/// program has no console, so its error line reaches nobody.
pub fn show_error_box(title: &str, text: &str) -> io::Result<()> {
    use windows_sys::Win32::UI::WindowsAndMessaging::{
        MB_ICONERROR, MB_OK, MB_SETFOREGROUND, MB_TOPMOST, MessageBoxW,
    };
    let (title, text) = (wide(OsStr::new(title)), wide(OsStr::new(text)));
    let style = MB_OK | MB_ICONERROR | MB_SETFOREGROUND | MB_TOPMOST;
    // SAFETY: both strings are NUL-terminated UTF-16 buffers that outlive the call, and no owner
    // window (null) is allowed; the call only reads them.
    let pressed =
        unsafe { MessageBoxW(std::ptr::null_mut(), text.as_ptr(), title.as_ptr(), style) };
    match pressed {
        0 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::windows::named_pipe::ClientOptions;

    /// Only real Windows enforces a DACL (Wine runs every program as one user and lets all in).
    #[tokio::test]
    async fn real_windows_the_pipe_dacl_refuses_another_user() {
        if under_wine() {
            // Wine has no anonymous token either: the call fails and leaves the thread as it was.
            assert!(as_anonymous(|| ()).is_err());
            eprintln!(
                "skipped under Wine: Wine enforces no DACL, so another user's refusal needs real Windows"
            );
            return;
        }
        let sid = current_user_sid().unwrap();
        let name = pipe_name("dacl");
        let _server =
            create_pipe_server(&name, &format!("D:P(A;;GA;;;{sid})(A;;GA;;;SY)"), true).unwrap();
        let as_other = as_anonymous(|| ClientOptions::new().open(&name)).unwrap();
        let e = as_other.expect_err("the anonymous user must not open the pipe");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }

    #[test]
    fn this_process_path_time_and_user() {
        let me = Process::current().unwrap();
        let exe = std::env::current_exe().unwrap();
        let path = me.image_path().unwrap();
        // Wine reports Z:\… for both; compare case-insensitively as Windows does.
        assert_eq!(
            path.to_string_lossy().to_lowercase(),
            exe.to_string_lossy().to_lowercase()
        );
        let created = me.creation_time().unwrap();
        assert!(created > 0 && created <= now_ticks(), "{created}");
        assert!(me.is_running().unwrap());
        let sid = me.user_sid().unwrap();
        assert!(sid.starts_with("S-1-5-"), "{sid}");
        assert_eq!(current_user_sid().unwrap(), sid);
    }

    #[test]
    fn an_ended_process_is_seen_as_ended() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let process = Process::open(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!process.is_running().unwrap());
        assert!(Process::open(u32::MAX - 3).is_err(), "no such process");
    }

    fn pipe_name(tag: &str) -> OsString {
        OsString::from(format!(
            r"\\.\pipe\cis2-os-test-{tag}-{}",
            std::process::id()
        ))
    }

    #[tokio::test]
    async fn pipe_descriptor_peers_and_first_instance() {
        let sid = current_user_sid().unwrap();
        let sddl = format!("D:P(A;;GA;;;{sid})(A;;GA;;;SY)");
        let name = pipe_name("sd");
        let server = create_pipe_server(&name, &sddl, true).unwrap();
        let read_back = security_sddl(&server).unwrap();
        assert!(
            read_back.contains(&format!("(A;;FA;;;{sid})"))
                || read_back.contains(&format!(";;;{sid})")),
            "{read_back}"
        );
        assert!(read_back.contains(";;;SY)"), "{read_back}");
        assert!(!read_back.contains(";;;WD)"), "no Everyone: {read_back}");
        // Another process asking for the first instance of this held name is refused.
        let other = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "windows::tests::hold_pipe",
                "--ignored",
                "--nocapture",
            ])
            .env("CIS2_OS_TEST_PIPE", &name)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&other.stdout);
        if said.contains("first instance granted") && under_wine() {
            // Wine 8 does not enforce FILE_FLAG_FIRST_PIPE_INSTANCE; the agent's own check (a client
            // probe before creating, in cis2-core's ipc::pipe) is what refuses a squatter there.
            eprintln!(
                "SKIPPED under Wine: FILE_FLAG_FIRST_PIPE_INSTANCE is not enforced by Wine 8"
            );
        } else {
            assert!(
                said.contains("first instance refused: PermissionDenied"),
                "{said}"
            );
        }
        let client = ClientOptions::new().open(&name).unwrap();
        server.connect().await.unwrap();
        assert_eq!(pipe_client_pid(&server).unwrap(), std::process::id());
        assert_eq!(pipe_server_pid(&client).unwrap(), std::process::id());
    }

    /// The box is a real window with the title given, and the call returns once it is closed.
    #[test]
    fn an_error_box_shows_until_it_is_closed() {
        use windows_sys::Win32::UI::WindowsAndMessaging::{FindWindowW, PostMessageW, WM_CLOSE};
        let title = format!("cis2-os test box {}", std::process::id());
        let shown = std::thread::spawn({
            let title = title.clone();
            move || show_error_box(&title, "config.toml:1: a test of the box.")
        });
        let wanted = wide(OsStr::new(&title));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let window = loop {
            // SAFETY: a NUL-terminated UTF-16 title that outlives the call; no class name (null).
            let found = unsafe { FindWindowW(std::ptr::null(), wanted.as_ptr()) };
            if !found.is_null() || std::time::Instant::now() > deadline || shown.is_finished() {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if window.is_null() && shown.is_finished() && under_wine() {
            let said = shown.join().unwrap();
            eprintln!("SKIPPED under Wine without a display: the box could not be made ({said:?})");
            return;
        }
        assert!(!window.is_null(), "no window titled {title:?} within 20 s");
        assert!(
            !shown.is_finished(),
            "the call returned with its box still open"
        );
        // SAFETY: posting a message to a window handle is sound even if the window has gone since.
        unsafe { PostMessageW(window, WM_CLOSE, 0, 0) };
        assert!(shown.join().unwrap().is_ok());
    }

    #[test]
    fn a_malformed_descriptor_is_an_error_naming_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let e = create_pipe_server(&pipe_name("bad"), "D:(nonsense", true).unwrap_err();
        assert!(e.to_string().contains("D:(nonsense"), "{e}");
    }

    /// Run by `pipe_descriptor_peers_and_first_instance` as another process.
    #[tokio::test]
    #[ignore = "a helper the pipe test runs in a process of its own"]
    async fn hold_pipe() {
        let name = std::env::var_os("CIS2_OS_TEST_PIPE").unwrap();
        match create_pipe_server(&name, "D:P(A;;GA;;;SY)", true) {
            Ok(_) => println!("first instance granted"),
            Err(e) => println!("first instance refused: {:?}", e.kind()),
        }
    }
}
