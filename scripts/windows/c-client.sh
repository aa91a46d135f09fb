#!/usr/bin/env bash
# The C client library on Windows, under Wine: cross-builds cis2_client.dll (crates/c-client) with
# mingw-w64, builds the C test program (crates/c-client/tests/c/c_client_test.c) against it with
# x86_64-w64-mingw32-gcc, and runs its scenarios against cis2-agentd.exe --sandbox over the named pipe.
# Called by scripts/test-windows with the folder of the cross-built programs and a prepared WINEPREFIX
# (scripts/wine-prefix); set CARGO_LOCK as for scripts/test-windows.
# Usage: scripts/windows/c-client.sh BIN_DIR [--built]   (--built: the caller has already built
# cis2-c-client, cis2-agentd, cis2ctl and cis2-mock-idp for x86_64-pc-windows-gnu into BIN_DIR)
# Each scenario prints the C program's "ok - …" lines; the last line is "windows c-client: N passed,
# M failed", non-zero exit when anything failed. Not under Wine (say so, checked on Linux instead):
# the workstation lock (Wine sends no WTS lock notification) and stopping the agent from the program.
set -uo pipefail
cd "$(dirname "$0")/../.."
target=x86_64-pc-windows-gnu
bin="$(cd "$1" && pwd)"
: "${WINEPREFIX:?set WINEPREFIX (scripts/wine-prefix makes one)}"
export WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
unset DISPLAY CIS2_AGENT_SOCK CIS2_AGENT_CONFIG
locked() { if [ -n "${CARGO_LOCK:-}" ]; then flock "$CARGO_LOCK" "$@"; else "$@"; fi; }

if [ "${2:-}" != "--built" ]; then
  locked cargo build --locked --target "$target" -p cis2-c-client -p cis2-agentd -p cis2ctl -p cis2-mock-idp || exit 1
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/cis2-win-c.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
# win (a Linux path as Windows programs see it) and start_agent.
. scripts/windows/lib.sh

mkdir -p "$work/bin"
cp "$bin"/{cis2-agentd,cis2ctl,cis2-scripted-browser}.exe "$bin/cis2_client.dll" "$work/bin/"
x86_64-w64-mingw32-gcc -std=gnu11 -Wall -Wextra -Werror -O1 -I crates/c-client \
  -o "$work/bin/ward-ehr.exe" crates/c-client/tests/c/c_client_test.c \
  "$bin/libcis2_client.dll.a" -static-libgcc || exit 1
export BROWSER="$(win "$work/bin/cis2-scripted-browser.exe")"
export CIS2_TEST_BROWSER_LOG="$(win "$work/browser.log")"

passed=0 failed=0
stop_agent() { kill -9 "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null; }
# Runs one scenario of the C program; counts its checks.
scenario() {
  local name="$1" out
  out="$(wine "$work/bin/ward-ehr.exe" "$name" "$pipe" 2>&1 | tr -d '\r')"
  echo "$out"
  passed=$((passed + $(grep -c '^ok - ' <<<"$out")))
  failed=$((failed + $(grep -c '^FAIL - ' <<<"$out")))
  grep -q "^c-client $name: [0-9]* passed, 0 failed" <<<"$out" || { echo "FAIL - scenario $name did not finish cleanly"; failed=$((failed + 1)); }
}
agent_or_fail() { start_agent "$@" --socket "$pipe" || { echo "FAIL - cis2-agentd.exe did not start: $(cat "$1.err")"; failed=$((failed + 1)); return 1; }; }

pipe="\\\\.\\pipe\\cis2-c-none-$$"
scenario no-agent

pipe="\\\\.\\pipe\\cis2-c-$$"
if agent_or_fail "$work/sandbox" --sandbox; then
  CIS2_AGENT_SOCK="$pipe" scenario signed-out
  CIS2_TEST_LOGOUT_CMD="$(win "$work/bin/cis2ctl.exe") --socket $pipe logout" scenario full
  stop_agent
fi

pipe="\\\\.\\pipe\\cis2-c-cancel-$$"
if CIS2_TEST_CANCEL=1 agent_or_fail "$work/cancel" --sandbox; then
  scenario sign-in-failed
  stop_agent
fi

self="$(win "$work/bin/ward-ehr.exe")"
cat >"$work/deny.toml" <<EOF2
environment = "sandbox"
[agent]
client_policy = "deny"
data_dir = '$(win "$work/deny-data")'
EOF2
pipe="\\\\.\\pipe\\cis2-c-deny-$$"
if agent_or_fail "$work/deny" --config "$(win "$work/deny.toml")"; then
  CIS2_TEST_SELF="$self" scenario denied
  stop_agent
fi
cat >"$work/allow.toml" <<EOF2
environment = "sandbox"
[agent]
client_policy = "deny"
data_dir = '$(win "$work/allow-data")'
[[clients]]
name = "Ward EHR"
path = '$self'
EOF2
pipe="\\\\.\\pipe\\cis2-c-allow-$$"
if agent_or_fail "$work/allow" --config "$(win "$work/allow.toml")"; then
  scenario allowed
  if grep -qF 'ward-ehr.exe' "$work/allow-data/audit.jsonl" 2>/dev/null; then
    echo "ok - the audit log records the C program itself"; passed=$((passed + 1))
  else
    echo "FAIL - the audit log does not name ward-ehr.exe"; failed=$((failed + 1))
  fi
  stop_agent
fi

echo "windows c-client: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
