# Shared by scripts/windows/e2e.sh and c-client.sh (sourced, not run): the Windows programs under Wine,
# from the folder "$work/bin"; processes started are added to the caller's "pids" array.

# A Linux path as Windows programs under Wine see it.
win() { local p="${1//\//\\}"; echo "Z:$p"; }

# Starts cis2-agentd.exe with ARGS (LOG.out and LOG.err get its output); waits for "listening on";
# sets $agent_pid. False if it ends first or does not listen within 30 s.
start_agent() {
  local log="$1"; shift
  wine "$work/bin/cis2-agentd.exe" "$@" >"$log.out" 2>"$log.err" &
  agent_pid=$!
  pids+=("$agent_pid")
  for _ in $(seq 1 300); do
    grep -q "^listening on" "$log.out" 2>/dev/null && return 0
    kill -0 "$agent_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
