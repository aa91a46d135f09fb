//! The agent itself, without a GUI: configuration, the OpenID Connect relying party for NHS CIS2, the
//! session state machine, the token store, the local IPC server and the audit log. Both front ends
//! (`cis2-agentd` and the desktop app) are thin layers over this crate.

pub mod config;
