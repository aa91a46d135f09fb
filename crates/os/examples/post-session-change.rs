//! A test helper, not shipped: posts a session change (`lock`, `unlock`, `logoff`, `disconnect` or a
//! `WTS_*` code) to every running agent's session window, as Windows does when the workstation is
//! locked — Wine never sends it. Prints the process ids posted to; exits 1 when no agent was found.
//! Usage (under Wine): wine post-session-change.exe lock

#[cfg(windows)]
fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let code = match arg.as_str() {
        "lock" => 7,
        "unlock" => 8,
        "logoff" => 6,
        "disconnect" => 2,
        other => match other.parse::<u32>() {
            Ok(code) => code,
            Err(_) => {
                eprintln!(
                    "usage: post-session-change lock|unlock|logoff|disconnect|CODE (got {other:?})"
                );
                std::process::exit(2);
            }
        },
    };
    match cis2_os::session::post_to_agents(code, None) {
        Ok(pids) if pids.is_empty() => {
            eprintln!("no agent's session window found (is cis2-agentd running with on_os_lock?)");
            std::process::exit(1);
        }
        Ok(pids) => println!("posted {arg} to {} window(s), pids {pids:?}", pids.len()),
        Err(e) => {
            eprintln!("posting the session change failed: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(not(windows))]
fn main() {
    eprintln!("post-session-change is a Windows test helper (see scripts/windows/e2e.sh)");
    std::process::exit(2);
}
