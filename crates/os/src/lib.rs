//! The operating-system calls that no vetted safe crate offers, kept in one small crate so that the rest
//! of the workspace can keep `unsafe_code = "forbid"`. Today that is Windows only: the executable path,
//! creation time and user of a process (who is on the other end of the agent's named pipe, and who owns
//! the pipe a client connects to), the current user's SID, creating a named pipe with a security
//! descriptor given in SDDL, reading a handle's security descriptor back, and the session notifications
//! (lock, unlock, logoff, switch user) of a message-only window ([`session`]), and the message box
//! the desktop app shows when it cannot start. On other systems the
//! crate is empty: Unix gets the same facts from safe crates (`rustix`, `/proc`).

#[cfg(windows)]
#[allow(unsafe_code)]
mod windows;

#[cfg(windows)]
pub use windows::*;

#[cfg(windows)]
#[allow(unsafe_code)]
pub mod session;
