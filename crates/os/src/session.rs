//! Windows session notifications: a message-only window registered with
//! `WTSRegisterSessionNotification`, on a thread of its own, turning `WM_WTSSESSION_CHANGE` into
//! [`SessionEvent`]s on a channel. Wine accepts the registration but never sends the message: tests post
//! it themselves ([`SessionWatch::post`]); real lock notifications need real Windows.

use std::cell::RefCell;
use std::io;
use std::sync::mpsc;
use windows_sys::Win32::Foundation::{HWND, LPARAM, LRESULT, POINT, WPARAM};
use windows_sys::Win32::System::LibraryLoader::GetModuleHandleW;
use windows_sys::Win32::System::RemoteDesktop::{
    NOTIFY_FOR_THIS_SESSION, WTSRegisterSessionNotification, WTSUnRegisterSessionNotification,
};
use windows_sys::Win32::System::Shutdown::LockWorkStation;
use windows_sys::Win32::UI::WindowsAndMessaging::{
    CreateWindowExW, DefWindowProcW, DestroyWindow, DispatchMessageW, FindWindowExW, GetMessageW,
    GetWindowThreadProcessId, HWND_MESSAGE, MSG, PostMessageW, PostQuitMessage, RegisterClassW,
    WM_CLOSE, WM_DESTROY, WM_WTSSESSION_CHANGE, WNDCLASSW,
};

/// The window class of the session window: how a test (or an admin's tool) finds a running agent's
/// window to post it a session change, since Wine never sends one.
pub const WINDOW_CLASS: &str = "cis2-agent-session";

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(std::iter::once(0)).collect()
}

/// What the session did (`wParam` of `WM_WTSSESSION_CHANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// `WTS_SESSION_LOCK` (7).
    Lock,
    /// `WTS_SESSION_UNLOCK` (8).
    Unlock,
    /// `WTS_SESSION_LOGOFF` (6).
    Logoff,
    /// `WTS_CONSOLE_DISCONNECT` (2) or `WTS_REMOTE_DISCONNECT` (4): switch user, or a remote session
    /// left.
    Disconnect,
    /// Any other code (connect, logon, remote control).
    Other(u32),
}

impl SessionEvent {
    pub fn from_code(code: u32) -> SessionEvent {
        match code {
            7 => SessionEvent::Lock,
            8 => SessionEvent::Unlock,
            6 => SessionEvent::Logoff,
            2 | 4 => SessionEvent::Disconnect,
            other => SessionEvent::Other(other),
        }
    }
}

thread_local! {
    /// Where the window procedure sends events; set on the window's own thread before it exists.
    static SINK: RefCell<Option<mpsc::Sender<SessionEvent>>> = const { RefCell::new(None) };
}

unsafe extern "system" fn window_proc(
    hwnd: HWND,
    message: u32,
    wparam: WPARAM,
    lparam: LPARAM,
) -> LRESULT {
    match message {
        WM_WTSSESSION_CHANGE => {
            let event = SessionEvent::from_code(wparam as u32);
            SINK.with(|sink| {
                if let Some(tx) = sink.borrow().as_ref() {
                    let _ = tx.send(event);
                }
            });
            0
        }
        WM_CLOSE => {
            // SAFETY: `hwnd` is this thread's window, given to its own procedure.
            unsafe {
                WTSUnRegisterSessionNotification(hwnd);
                DestroyWindow(hwnd);
            }
            0
        }
        WM_DESTROY => {
            // SAFETY: ends this thread's message loop; no pointers involved.
            unsafe { PostQuitMessage(0) };
            0
        }
        // SAFETY: the arguments are the ones the system gave this procedure, passed on unchanged.
        _ => unsafe { DefWindowProcW(hwnd, message, wparam, lparam) },
    }
}

/// A running watch; dropping it closes the window and ends its thread.
pub struct SessionWatch {
    /// The window's handle as a number (a handle is not `Send`; only `PostMessageW` uses it).
    hwnd: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn create_window() -> io::Result<HWND> {
    let class = wide(WINDOW_CLASS);
    // SAFETY: a null name asks for this program's own module handle; nothing is freed.
    let instance = unsafe { GetModuleHandleW(std::ptr::null()) };
    let description = WNDCLASSW {
        style: 0,
        lpfnWndProc: Some(window_proc),
        cbClsExtra: 0,
        cbWndExtra: 0,
        hInstance: instance,
        hIcon: std::ptr::null_mut(),
        hCursor: std::ptr::null_mut(),
        hbrBackground: std::ptr::null_mut(),
        lpszMenuName: std::ptr::null(),
        lpszClassName: class.as_ptr(),
    };
    // SAFETY: `description` is fully set and its strings live through the call. A second
    // registration (another watch in this process) fails harmlessly and the class is reused.
    unsafe { RegisterClassW(&description) };
    // SAFETY: the class is registered (now or before); HWND_MESSAGE makes a message-only window.
    let hwnd = unsafe {
        CreateWindowExW(
            0,
            class.as_ptr(),
            class.as_ptr(),
            0,
            0,
            0,
            0,
            0,
            HWND_MESSAGE,
            std::ptr::null_mut(),
            instance,
            std::ptr::null(),
        )
    };
    if hwnd.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `hwnd` is the window just created on this thread.
    if unsafe { WTSRegisterSessionNotification(hwnd, NOTIFY_FOR_THIS_SESSION) } == 0 {
        let e = io::Error::last_os_error();
        // SAFETY: as above; the window is not used after this.
        unsafe { DestroyWindow(hwnd) };
        return Err(e);
    }
    Ok(hwnd)
}

impl SessionWatch {
    /// Starts the window's thread; session events arrive on `events`.
    pub fn start(events: mpsc::Sender<SessionEvent>) -> io::Result<SessionWatch> {
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<usize>>();
        let thread = std::thread::Builder::new()
            .name("cis2-wts".into())
            .spawn(move || {
                SINK.with(|sink| *sink.borrow_mut() = Some(events));
                let hwnd = match create_window() {
                    Ok(hwnd) => hwnd,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(hwnd as usize));
                let mut message = MSG {
                    hwnd: std::ptr::null_mut(),
                    message: 0,
                    wParam: 0,
                    lParam: 0,
                    time: 0,
                    pt: POINT { x: 0, y: 0 },
                };
                // SAFETY: `message` is a valid MSG to fill; 0 ends the loop (WM_QUIT), -1 is an error.
                while unsafe { GetMessageW(&mut message, std::ptr::null_mut(), 0, 0) } > 0 {
                    // SAFETY: `message` was just filled by GetMessageW.
                    unsafe { DispatchMessageW(&message) };
                }
            })?;
        let hwnd = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the session window's thread ended early"))??;
        Ok(SessionWatch {
            hwnd,
            thread: Some(thread),
        })
    }

    /// Posts `WM_WTSSESSION_CHANGE` with `code` to the window, as Windows sends it (for tests: Wine
    /// never does).
    pub fn post(&self, code: u32) -> io::Result<()> {
        // SAFETY: the window lives until this value is dropped; posting copies the numbers.
        let ok =
            unsafe { PostMessageW(self.hwnd as HWND, WM_WTSSESSION_CHANGE, code as WPARAM, 0) };
        if ok == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Posts `WM_WTSSESSION_CHANGE` with `code` to the session window of every agent on this desktop
/// (message-only windows of class [`WINDOW_CLASS`]), or only to process `only`'s, as Windows sends it
/// on a lock or unlock. Returns the process ids of the windows posted to (none when no agent watches
/// the session).
pub fn post_to_agents(code: u32, only: Option<u32>) -> io::Result<Vec<u32>> {
    let class = wide(WINDOW_CLASS);
    let mut posted = Vec::new();
    let mut after: HWND = std::ptr::null_mut();
    loop {
        // SAFETY: `class` is NUL-terminated and outlives the call; HWND_MESSAGE searches the
        // message-only windows, `after` is null or a window this search returned.
        let hwnd = unsafe { FindWindowExW(HWND_MESSAGE, after, class.as_ptr(), std::ptr::null()) };
        if hwnd.is_null() {
            return Ok(posted);
        }
        let mut pid = 0u32;
        // SAFETY: `pid` is a valid u32 to fill; a window gone meanwhile gives 0, which is harmless.
        unsafe { GetWindowThreadProcessId(hwnd, &mut pid) };
        after = hwnd;
        if only.is_some_and(|wanted| wanted != pid) {
            continue;
        }
        // SAFETY: posting copies the numbers; a window that went away meanwhile fails the call.
        if unsafe { PostMessageW(hwnd, WM_WTSSESSION_CHANGE, code as WPARAM, 0) } == 0 {
            return Err(io::Error::last_os_error());
        }
        posted.push(pid);
    }
}

/// Locks the workstation as Win+L does (`LockWorkStation`): only the real-Windows test of lock
/// notifications calls it. Wine does not implement it and says so with an error.
pub fn lock_workstation() -> io::Result<()> {
    // SAFETY: no arguments; the call only asks the system to show the lock screen.
    if unsafe { LockWorkStation() } == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        // SAFETY: the window is alive (its thread only ends after WM_CLOSE, sent here once).
        unsafe { PostMessageW(self.hwnd as HWND, WM_CLOSE, 0, 0) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The tests that watch a session window of this process take turns: each would find the other's.
    static ONE_WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_window() -> std::sync::MutexGuard<'static, ()> {
        ONE_WINDOW.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn a_posted_lock_and_unlock_arrive_in_order() {
        let _turn = one_window();
        let (tx, rx) = mpsc::channel();
        let watch = SessionWatch::start(tx).unwrap();
        watch.post(7).unwrap();
        watch.post(8).unwrap();
        watch.post(6).unwrap();
        let next = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(next(), SessionEvent::Lock);
        assert_eq!(next(), SessionEvent::Unlock);
        assert_eq!(next(), SessionEvent::Logoff);
        drop(watch);
        assert!(
            rx.recv_timeout(Duration::from_secs(2)).is_err(),
            "the thread ended and dropped its sender"
        );
    }

    #[test]
    fn another_program_finds_the_window_by_its_class_and_posts_to_it() {
        let _turn = one_window();
        let (tx, rx) = mpsc::channel();
        let watch = SessionWatch::start(tx).unwrap();
        let posted = post_to_agents(7, Some(std::process::id())).unwrap();
        assert_eq!(
            posted,
            vec![std::process::id()],
            "this process's one window, found by its class"
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            SessionEvent::Lock
        );
        drop(watch);
    }

    /// Real notifications need a real session to lock: this one locks the workstation it runs on, so
    /// it runs only when asked (`--ignored`) on real Windows; under Wine it skips, saying so, because
    /// Wine never sends the notification.
    #[test]
    #[ignore = "locks this workstation: run on real Windows with --ignored, then unlock it"]
    fn real_windows_workstation_lock_is_notified() {
        if crate::under_wine() {
            eprintln!(
                "skipped under Wine: Wine never sends WM_WTSSESSION_CHANGE (needs real Windows)"
            );
            return;
        }
        let _turn = one_window();
        let (tx, rx) = mpsc::channel();
        let _watch = SessionWatch::start(tx).unwrap();
        lock_workstation().unwrap();
        let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(first, SessionEvent::Lock);
    }

    /// Wine has no lock screen: the call must come back as an error, not lock or crash anything.
    #[test]
    fn under_wine_locking_the_workstation_is_an_error() {
        if !crate::under_wine() {
            eprintln!(
                "skipped on real Windows: it would lock this workstation (see real_windows_workstation_lock_is_notified)"
            );
            return;
        }
        assert!(lock_workstation().is_err());
    }

    #[test]
    fn codes_map_to_events() {
        assert_eq!(SessionEvent::from_code(2), SessionEvent::Disconnect);
        assert_eq!(SessionEvent::from_code(4), SessionEvent::Disconnect);
        assert_eq!(SessionEvent::from_code(5), SessionEvent::Other(5));
    }
}
