//! The local socket: JSON-RPC 2.0, one object per line (at most 64 KiB), for the desktop programs of
//! the same OS user. The server is a thin adapter over [`crate::agent::Agent`]; nothing a client sends
//! can crash or block the agent.

pub mod framing;
pub mod paths;
pub mod protocol;
pub mod server;

pub use server::{ServeOptions, serve};

/// The longest line a client may send.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
