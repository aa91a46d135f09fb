//! `cis2-agent-app`: the desktop app itself (agent, tray, and its window process), which the
//! `cis2-agent` launcher becomes on Linux when no app of this person is running yet. See the library
//! (`cis2_agent_app`) and ARCHITECTURE.md.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

/// Every heap block is zeroed when freed, as in `cis2-agentd`: the agent's core runs in this process.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

fn main() {
    cis2_agent_app::run();
}
