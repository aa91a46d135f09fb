//! The return codes of every `cis2_*` call that returns an `int`. Fixed by the contract: an EHR
//! compiled against one release keeps working with the next.

use std::ffi::c_int;

/// Done.
pub const CIS2_OK: c_int = 0;
/// Nobody is signed in (JSON-RPC -32001).
pub const CIS2_E_NOT_SIGNED_IN: c_int = 1;
/// The sign-in failed or was cancelled; cis2_last_error() says why (JSON-RPC -32002).
pub const CIS2_E_SIGN_IN_FAILED: c_int = 2;
/// The agent's policy does not allow this program, or this call (JSON-RPC -32003).
pub const CIS2_E_NOT_ALLOWED: c_int = 3;
/// The session is locked: the clinician must sign in again (JSON-RPC -32004).
pub const CIS2_E_LOCKED: c_int = 4;
/// The agent could not reach the Care Identity Service or the relay (JSON-RPC -32005).
pub const CIS2_E_UNREACHABLE: c_int = 5;
/// No agent answers at the endpoint (not running, restarted, or not this user's).
pub const CIS2_E_NO_AGENT: c_int = 6;
/// The buffer is too small; *used says how large it must be.
pub const CIS2_E_BUFFER_TOO_SMALL: c_int = 7;
/// A bad argument (a NULL handle, a NULL buffer with a capacity, a value the agent refused).
pub const CIS2_E_BAD_ARGUMENT: c_int = 8;
/// The agent answered something this library does not understand, or an error it has no code for.
pub const CIS2_E_PROTOCOL: c_int = 9;
