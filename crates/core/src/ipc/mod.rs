//! The local socket: JSON-RPC 2.0, one object per line (at most 64 KiB), for the desktop programs of
//! the same OS user. The server is a thin adapter over [`crate::agent::Agent`]; nothing a client sends
//! can crash or block the agent. The transport is a Unix socket on Linux and macOS ([`socket`]) and a
//! named pipe on Windows ([`pipe`]); both hand their connections to [`server`], so framing, limits,
//! events and errors are the same byte for byte.

pub mod framing;
mod outbox;
pub mod paths;
#[cfg(windows)]
pub mod pipe;
pub mod protocol;
pub mod server;
#[cfg(unix)]
pub mod socket;

#[cfg(windows)]
pub use pipe::{Bound, bind, serve};
pub use server::ServeOptions;
#[cfg(unix)]
pub use socket::{Bound, bind, serve};

/// The longest line a client may send.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
