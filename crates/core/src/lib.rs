//! The agent itself, without a GUI: configuration, the OpenID Connect relying party for NHS CIS2, the
//! session and its single-flight sign-in and refresh, the local IPC server, and the edges that tests
//! replace (clock, browser, HTTP). Both front ends (`cis2-agentd` and the desktop app) are thin layers
//! over [`agent::Agent`] and [`ipc::serve`]; nothing here knows about windows.

pub mod agent;
pub mod audit;
pub mod browser;
pub mod clock;
pub mod config;
pub mod http;
pub mod ipc;
pub mod oidc;
pub mod peer;
pub mod policy;
pub mod secret;
pub mod store;
pub mod workstation;
