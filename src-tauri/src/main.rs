//! `cis2-agent`: the desktop app. See the library (`cis2_agent_app`) and ARCHITECTURE.md.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

/// Every heap block is zeroed when freed, as in `cis2-agentd`: the agent's core runs in this process.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

fn main() {
    cis2_agent_app::run();
}
