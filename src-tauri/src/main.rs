//! `cis2-agent`, the program a person (or start at sign-in) runs. On Linux it is a small launcher
//! without GTK or WebKit linked: the dynamic loader binds their symbols eagerly (Debian links them
//! `-z now`), some 65 ms before `main`, which a second launch would pay only to hand over. So this
//! hands a second launch to the running app over D-Bus ([`handoff`]) and exits, and otherwise
//! becomes the app, `cis2-agent-app` beside it (exec: same process, arguments and streams).
//! Elsewhere it is the app itself (on Windows the single-instance hand-over is a named mutex and a
//! window message, quick without this). See the library (`cis2_agent_app`) and ARCHITECTURE.md.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

#[cfg(target_os = "linux")]
#[path = "launcher.rs"]
mod launcher;

#[cfg(target_os = "linux")]
fn main() {
    launcher::run();
}

/// Every heap block is zeroed when freed, as in `cis2-agentd`: the agent's core runs in this process.
#[cfg(not(target_os = "linux"))]
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

#[cfg(not(target_os = "linux"))]
fn main() {
    cis2_agent_app::run();
}
