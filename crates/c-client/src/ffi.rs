//! The exported C functions: the only `unsafe` of this crate. Each turns C's raw pointers into Rust
//! references in one small block, calls the safe [`crate::client`], and runs inside `catch_unwind`, so
//! a panic becomes `CIS2_E_PROTOCOL` with a message instead of crossing into the EHR.

use crate::client::{Cis2Client, Error};
use crate::codes::*;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    /// The calling thread's last error, kept until its next call (the pointer handed out stays valid).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = text);
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Runs one call: clears the thread's last error, catches any panic, and turns the outcome into a code.
fn guard(call: impl FnOnce() -> Result<(), Error>) -> c_int {
    set_last_error("");
    let error = match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => return CIS2_OK,
        Ok(Err(error)) => error,
        Err(panic) => Error::new(
            CIS2_E_PROTOCOL,
            format!(
                "internal error in cis2_client (a bug: please report it): {}",
                panic_text(panic.as_ref())
            ),
        ),
    };
    set_last_error(&error.message);
    error.code
}

fn null_client() -> Error {
    Error::new(
        CIS2_E_BAD_ARGUMENT,
        "the cis2_client is NULL: pass the handle cis2_open returned",
    )
}

/// Copies `text` and a NUL terminator into `out`, or says how much room it needs.
fn fill<T: Copy + Default>(out: Option<&mut [T]>, text: &[T], unit: &str) -> Result<(), Error> {
    let needed = text.len() + 1;
    let out = out.unwrap_or_default();
    if out.len() < needed {
        return Err(Error::new(
            CIS2_E_BUFFER_TOO_SMALL,
            format!(
                "the buffer holds {} {unit}, the answer needs {needed} (with its NUL): *used says so; call again with a buffer that large",
                out.len()
            ),
        ));
    }
    out[..text.len()].copy_from_slice(text);
    out[text.len()] = T::default();
    Ok(())
}

/// The body of every call that answers into a caller's buffer of `T` (bytes, or UTF-16 units).
///
/// # Safety
/// `c` is NULL or a live handle from `cis2_open`; `buf` is NULL or points to `cap` writable `T`s;
/// `used` is NULL or points to a writable `size_t`.
unsafe fn answer<T: Copy + Default>(
    c: *mut Cis2Client,
    buf: *mut T,
    cap: usize,
    used: *mut usize,
    unit: &str,
    call: impl FnOnce(&Cis2Client) -> Result<Vec<T>, Error>,
) -> c_int {
    let mut needed = 0;
    let code = guard(|| {
        // SAFETY: the header's contract: `c` is NULL or what cis2_open returned, not yet closed.
        let client = unsafe { c.as_ref() }.ok_or_else(null_client)?;
        let out = if buf.is_null() {
            if cap != 0 {
                return Err(Error::new(
                    CIS2_E_BAD_ARGUMENT,
                    format!(
                        "buf is NULL but cap is {cap}: pass a buffer of cap {unit}, or NULL with cap 0 to ask for the size"
                    ),
                ));
            }
            None
        } else {
            if !buf.is_aligned() || cap > isize::MAX as usize / size_of::<T>() {
                return Err(Error::new(
                    CIS2_E_BAD_ARGUMENT,
                    format!("buf is misaligned or cap ({cap}) is impossibly large"),
                ));
            }
            // SAFETY: the header's contract: a non-NULL `buf` has room for `cap` units, which
            // nothing else touches during the call; aligned and within isize::MAX bytes (checked).
            let out = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
            if let Some(first) = out.first_mut() {
                // An empty string, so a caller that ignores the code never reads stale text.
                *first = T::default();
            }
            Some(out)
        };
        let text = call(client)?;
        needed = text.len() + 1;
        fill(out, &text, unit)
    });
    if !used.is_null() {
        let report = if code == CIS2_OK || code == CIS2_E_BUFFER_TOO_SMALL {
            needed
        } else {
            0
        };
        // SAFETY: the header's contract: a non-NULL `used` points to a writable size_t.
        unsafe { used.write(report) };
    }
    code
}

fn utf8(text: String) -> Vec<u8> {
    text.into_bytes()
}

fn utf16(text: String) -> Vec<u16> {
    text.encode_utf16().collect()
}

/// Connects to the agent. `endpoint`: the socket path (Unix) or pipe name (`\\.\pipe\NAME`, Windows),
/// UTF-8; NULL for the default (`$CIS2_AGENT_SOCK`, else the OS default). Returns NULL when no agent
/// answers there (see cis2_last_error()). Close the handle with cis2_close.
///
/// # Safety
/// `endpoint` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_open(endpoint: *const c_char) -> *mut Cis2Client {
    let mut handle = std::ptr::null_mut();
    guard(|| {
        let endpoint = if endpoint.is_null() {
            None
        } else {
            // SAFETY: the header's contract: a non-NULL endpoint is a NUL-terminated string.
            let text = unsafe { CStr::from_ptr(endpoint) };
            Some(text.to_str().map_err(|_| {
                Error::new(
                    CIS2_E_BAD_ARGUMENT,
                    "the endpoint is not UTF-8: pass the socket path or pipe name as UTF-8",
                )
            })?)
        };
        handle = Box::into_raw(Box::new(Cis2Client::open(endpoint)?));
        Ok(())
    });
    handle
}

/// Closes the handle: its connections end, and its event callback has returned and is not called
/// again by the time this returns (except when called from the callback itself). NULL is ignored.
///
/// # Safety
/// `c` is NULL or a handle from cis2_open, closed once, and no other thread is using it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_close(c: *mut Cis2Client) {
    if c.is_null() {
        return;
    }
    guard(|| {
        // SAFETY: the header's contract: `c` came from cis2_open (Box::into_raw) and is closed once.
        drop(unsafe { Box::from_raw(c) });
        Ok(())
    });
}

/// The agent's `status` result as UTF-8 JSON: state, environment ("sandbox" is NOT NHS CIS2), user,
/// expires_at. Answered for every program, whatever the agent's client policy.
///
/// # Safety
/// `c` is NULL or a live handle; `buf` is NULL (with `cap` 0) or has `cap` writable bytes; `used` is
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_status_json(
    c: *mut Cis2Client,
    buf: *mut c_char,
    cap: usize,
    used: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf.cast::<u8>(), cap, used, "bytes", |c| {
            c.status_json().map(utf8)
        })
    }
}

/// The signed-in user (uid, name, roles, selected_role, assurance) as UTF-8 JSON.
///
/// # Safety
/// As cis2_status_json.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_whoami_json(
    c: *mut Cis2Client,
    buf: *mut c_char,
    cap: usize,
    used: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf.cast::<u8>(), cap, used, "bytes", |c| {
            c.whoami_json().map(utf8)
        })
    }
}

/// The bare access token, valid at least `min_valid_secs` more seconds (0 to 86400). If nobody is
/// signed in, or the session is locked, the agent's sign-in opens in the browser and this waits for it.
/// Never log the token.
///
/// # Safety
/// As cis2_status_json.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_get_token(
    c: *mut Cis2Client,
    min_valid_secs: c_uint,
    buf: *mut c_char,
    cap: usize,
    used: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf.cast::<u8>(), cap, used, "bytes", |c| {
            c.token(min_valid_secs, true).map(utf8)
        })
    }
}

/// As cis2_get_token, but never starts a sign-in: CIS2_E_NOT_SIGNED_IN or CIS2_E_LOCKED instead.
///
/// # Safety
/// As cis2_status_json.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_get_token_no_auth(
    c: *mut Cis2Client,
    min_valid_secs: c_uint,
    buf: *mut c_char,
    cap: usize,
    used: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf.cast::<u8>(), cap, used, "bytes", |c| {
            c.token(min_valid_secs, false).map(utf8)
        })
    }
}

/// cis2_whoami_json in UTF-16 (Windows' wide strings); `cap_units` and `*used_units` count
/// 16-bit units, not bytes, the NUL included.
///
/// # Safety
/// `c` is NULL or a live handle; `buf` is NULL (with `cap_units` 0) or has `cap_units` writable,
/// aligned uint16_t; `used_units` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_whoami_json_w(
    c: *mut Cis2Client,
    buf: *mut u16,
    cap_units: usize,
    used_units: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf, cap_units, used_units, "UTF-16 units", |c| {
            c.whoami_json().map(utf16)
        })
    }
}

/// cis2_get_token in UTF-16 units (may start a sign-in, as cis2_get_token).
///
/// # Safety
/// As cis2_whoami_json_w.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_get_token_w(
    c: *mut Cis2Client,
    min_valid_secs: c_uint,
    buf: *mut u16,
    cap_units: usize,
    used_units: *mut usize,
) -> c_int {
    // SAFETY: the caller's pointers, as this function's contract says.
    unsafe {
        answer(c, buf, cap_units, used_units, "UTF-16 units", |c| {
            c.token(min_valid_secs, true).map(utf16)
        })
    }
}

/// Calls `on_event(event_json, user)` for each event of the agent (signed_in, signed_out,
/// role_changed, token_refreshed, locked, unlocked, session_expiring, resync, and types added later),
/// on a thread of the library's, over a connection of its own. When that connection ends (the agent
/// stopped) the last call is `{"type":"disconnected","reason":…}`; subscribe again to resume. A second
/// call replaces the first; `on_event` NULL stops the events. `event_json` is valid during the call only.
///
/// # Safety
/// `c` is NULL or a live handle; `on_event` is NULL or a function safe to call from another thread
/// with `user` until cis2_close or the next cis2_subscribe returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cis2_subscribe(
    c: *mut Cis2Client,
    on_event: Option<extern "C" fn(event_json: *const c_char, user: *mut c_void)>,
    user: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: the header's contract: `c` is NULL or what cis2_open returned, not yet closed.
        let client = unsafe { c.as_ref() }.ok_or_else(null_client)?;
        client.subscribe(on_event, user.expose_provenance())
    })
}

/// The calling thread's last error, UTF-8: a sentence that says what to do; "" after a call that
/// succeeded. Valid until this thread's next call into the library. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn cis2_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The library's version, e.g. "0.1.0".
#[unsafe(no_mangle)]
pub extern "C" fn cis2_version() -> *const c_char {
    VERSION.as_ptr()
}

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(version) => version,
        Err(_) => c"unknown",
    };

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: cis2_last_error never returns NULL and its text lives until this thread's next call.
        unsafe { CStr::from_ptr(cis2_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_inside_a_call_becomes_a_protocol_error_with_its_message() {
        let code = guard(|| panic!("boom"));
        assert_eq!(code, CIS2_E_PROTOCOL);
        assert!(last_error().contains("boom"), "{}", last_error());
        assert_eq!(guard(|| Ok(())), CIS2_OK);
        assert_eq!(
            last_error(),
            "",
            "a call that succeeds clears the last error"
        );
    }

    #[test]
    fn the_last_error_belongs_to_the_calling_thread() {
        guard(|| Err(Error::new(CIS2_E_LOCKED, "this thread's")));
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            guard(|| Err(Error::new(CIS2_E_NOT_SIGNED_IN, "the other thread's")));
            assert_eq!(last_error(), "the other thread's");
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), "this thread's");
    }

    #[test]
    fn a_null_handle_or_a_null_buffer_with_a_capacity_is_a_bad_argument() {
        let mut used = 99usize;
        // SAFETY: NULL handle and buffer are what is being tested; `used` is a local.
        let code =
            unsafe { cis2_status_json(std::ptr::null_mut(), std::ptr::null_mut(), 0, &mut used) };
        assert_eq!(code, CIS2_E_BAD_ARGUMENT);
        assert_eq!(used, 0);
        assert!(last_error().contains("cis2_open"), "{}", last_error());
        // SAFETY: as above.
        unsafe { cis2_close(std::ptr::null_mut()) };
        // SAFETY: a NULL endpoint is allowed; the result is checked.
        let none = unsafe { cis2_open(c"".as_ptr()) };
        assert!(none.is_null());
        assert!(
            last_error().contains("endpoint is empty"),
            "{}",
            last_error()
        );
    }

    #[test]
    fn fill_writes_the_text_and_its_nul_or_reports_the_room_needed() {
        let mut room = [7u16; 4];
        assert_eq!(fill(Some(&mut room[..]), &[1, 2, 3], "units"), Ok(()));
        assert_eq!(room, [1, 2, 3, 0]);
        let short = fill(Some(&mut room[..3]), &[1, 2, 3], "units").unwrap_err();
        assert_eq!(short.code, CIS2_E_BUFFER_TOO_SMALL);
        assert!(short.message.contains("needs 4"), "{}", short.message);
        assert_eq!(
            fill::<u8>(None, b"", "bytes").unwrap_err().code,
            CIS2_E_BUFFER_TOO_SMALL
        );
    }

    #[test]
    fn the_version_is_the_crates() {
        // SAFETY: cis2_version returns a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(cis2_version()) };
        assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
