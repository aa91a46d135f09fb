//! The agent itself, without a GUI: configuration, the OpenID Connect relying party for NHS CIS2, the
//! session and its single-flight sign-in and refresh, the local IPC server, and the edges that tests
//! replace (clock, browser, HTTP). Both front ends (`cis2-agentd` and the desktop app) are thin layers
//! over [`agent::Agent`] and [`ipc::serve`]; nothing here knows about windows.
//!
//! Feature `test-hooks` (off by default, and never in release builds or packages): the environment
//! variables through which the system tests crash or slow the agent.

pub mod agent;
pub mod audit;
pub mod autostart;
pub mod config;
pub mod desktop;
pub mod ipc;
pub mod peer;
pub mod policy;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod service;
pub mod smartcard;
pub mod store;
pub mod workstation;

// The relying party is its own crate so the relay shares it; these keep the agent's paths.
pub use cis2_oidc::{browser, clock, http, secret};
pub mod oidc {
    pub use cis2_oidc::{authorize, claims, discovery, exchange, loopback, relay, rp, validate};
}
