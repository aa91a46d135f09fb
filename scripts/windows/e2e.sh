#!/usr/bin/env bash
# The Windows programs as processes under Wine, over the named pipe: called by scripts/test-windows
# with the folder of the cross-built .exe files and a prepared WINEPREFIX (scripts/wine-prefix).
# Usage: scripts/windows/e2e.sh BIN_DIR
# Each check prints "ok - …" or "FAIL - …"; the last line is "windows e2e: N passed, M failed" and the
# exit status is non-zero when anything failed. What Wine cannot show is listed in docs/deployment.md.
set -uo pipefail
bin="$(cd "$1" && pwd)"
: "${WINEPREFIX:?set WINEPREFIX (scripts/wine-prefix makes one)}"
export WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
unset DISPLAY CIS2_AGENT_SOCK CIS2_AGENT_CONFIG
work="$(mktemp -d "${TMPDIR:-/tmp}/cis2-win-e2e.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
passed=0 failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1"; failed=$((failed + 1)); }
check() { if eval "$2"; then ok "$1"; else fail "$1"; fi; }
# win (a Linux path as Windows programs see it) and start_agent.
. "$(dirname "$0")/lib.sh"

# The programs in a folder of their own (the paths the agent sees are these).
mkdir -p "$work/bin" "$work/other"
cp "$bin"/{cis2-agentd,cis2ctl,cis2-mock-idp,cis2-scripted-browser}.exe "$work/bin/"
cp "$bin/cis2ctl.exe" "$work/other/cis2ctl.exe"
export BROWSER="$(win "$work/bin/cis2-scripted-browser.exe")"
export CIS2_TEST_BROWSER_LOG="$(win "$work/browser.log")"
ctl() { wine "$work/bin/cis2ctl.exe" --socket "$pipe" "$@"; }

# 1. The sandbox over the pipe: status, sign-in with the scripted browser, whoami, token.
pipe="\\\\.\\pipe\\cis2-e2e-$$"
check "cis2-agentd.exe --sandbox listens on the pipe" "start_agent '$work/sandbox' --sandbox --socket '$pipe'"
check "it prints the pipe's name" "grep -qF 'listening on $pipe' '$work/sandbox.out'"
# Wine's WinSCard is a stub with no service: the agent says so and carries on (card rules: unit tests).
wait_log() { for _ in $(seq 1 100); do grep -q "$1" "$2" && return 0; sleep 0.1; done; return 1; }
check "with no smartcard service (WinSCard under Wine) the agent says so" "wait_log 'no smartcard service yet' '$work/sandbox.err'"
status="$(ctl status --json 2>&1)"
check "cis2ctl.exe status over the pipe: signed out, sandbox" "grep -q '\"environment\": *\"sandbox\"' <<<'$status'"
check "cis2ctl.exe login through the scripted browser" "ctl login >'$work/login.out' 2>&1"
whoami="$(ctl whoami --json 2>&1)"
check "whoami names the sandbox clinician" "grep -q '555021935107' <<<'$whoami'"
token="$(ctl token 2>/dev/null)"
check "token gives an access token" "[ \${#token} -gt 20 ]"

# 1b. Walking away: Windows' WM_WTSSESSION_CHANGE, posted to the agent's session window as Windows
# sends it on Win+L (Wine never sends it; crates/os/examples/post-session-change.rs finds the window
# by its class). on_os_lock = "lock" (the sandbox's default) locks the session; an OS unlock leaves it
# locked, as logind's Unlock does on Linux: the clinician signs in again.
post() { wine "$bin/examples/post-session-change.exe" "$1" >>"$work/post.out" 2>&1; }
state() { ctl status --json 2>/dev/null | grep -o '"state": *"[a-z_]*"' | grep -o '[a-z_]*"$' | tr -d '"'; }
wait_state() { for _ in $(seq 1 100); do [ "$(state)" = "$1" ] && return 0; sleep 0.1; done; return 1; }
check "a posted session lock finds the agent's window" "post lock"
check "and locks the agent (status: locked)" "wait_state locked"
check "status says why" "ctl status --json 2>&1 | grep -q 'workstation was locked'"
check "token is refused while locked" "! ctl token >/dev/null 2>&1"
check "the agent watches the session (its log says so)" "grep -q 'watching Windows session notifications' '$work/sandbox.err'"
check "a posted session unlock finds the agent's window" "post unlock"
check "the agent took the unlock (its log says so)" "wait_log 'workstation was unlocked' '$work/sandbox.err'"
check "and leaves it locked until the clinician signs in again (as on Linux)" "[ \"\$(state)\" = locked ]"
check "signing in again unlocks" "ctl login >'$work/relogin.out' 2>&1 && wait_state signed_in"
check "token is given again" "ctl token >/dev/null 2>&1"

# 2. Squatting: a second agent on a held pipe refuses to start, says why, and exits non-zero.
wine "$work/bin/cis2-agentd.exe" --sandbox --socket "$pipe" >"$work/squat.out" 2>"$work/squat.err"
code=$?
check "a second agent on the held pipe exits 1 (got $code)" "[ $code -eq 1 ]"
check "and says it refuses to start" "grep -q 'refusing to start' '$work/squat.err'"
check "and never said it was listening" "! grep -q 'listening on' '$work/squat.out'"
check "the first agent still answers" "ctl status >/dev/null 2>&1"
kill -9 "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null

# 3. A real (non-sandbox) provider: Credential Manager store, [[clients]] by path and hash, audit.
cat >"$work/clients.toml" <<'EOF'
[[clients]]
client_id = "win.apps.national"
auth_method = "none"
redirect_uris = ["http://127.0.0.1/callback"]
refresh_tokens = true
rotate_refresh_tokens = true
EOF
wine "$work/bin/cis2-mock-idp.exe" --port 0 --clients "$(win "$work/clients.toml")" >"$work/idp.out" 2>"$work/idp.err" &
pids+=($!)
issuer=""
for _ in $(seq 1 300); do
  issuer="$(grep -o 'http://127[^ ]*' "$work/idp.out" "$work/idp.err" 2>/dev/null | head -1 | sed 's/^[^:]*://')"
  [ -n "$issuer" ] && break
  sleep 0.1
done
check "cis2-mock-idp.exe runs as the provider ($issuer)" "[ -n '$issuer' ]"
ctl_path="$(win "$work/bin/cis2ctl.exe")"
ctl_hash="$(sha256sum "$work/bin/cis2ctl.exe" | cut -d' ' -f1)"
data="$work/data"
cat >"$work/config.toml" <<EOF
environment = "custom"
[provider]
issuer = "$issuer"
client_id = "win.apps.national"
[provider.exchange]
method = "none"
[agent]
client_policy = "deny"
store = "keyring"
data_dir = '$(win "$data")'
[[clients]]
name = "cis2ctl"
path = '$(tr '[:lower:]' '[:upper:]' <<<"$ctl_path")'
sha256 = "$ctl_hash"
methods = ["status", "login", "whoami", "token", "logout"]
EOF
pipe="\\\\.\\pipe\\cis2-e2e-real-$$"
check "cis2-agentd.exe starts with the provider and a keyring store" "start_agent '$work/real' --config '$(win "$work/config.toml")' --socket '$pipe'"
status="$(ctl status --json 2>&1)"
check "status: the store is the keychain (Credential Manager)" "grep -q '\"kind\": *\"keyring\"' <<<'$status'"
check "the listed cis2ctl.exe (path written in upper case, and hash) signs in" "ctl login >'$work/login2.out' 2>&1"
token="$(ctl token 2>/dev/null)"
check "and gets a token" "[ \${#token} -gt 20 ]"
check "the session is sealed in data_dir/session.bin" "[ -s '$data/session.bin' ]"
check "no token in clear in session.bin" "! grep -qF -e '$token' '$data/session.bin'"
refused="$(wine "$work/other/cis2ctl.exe" --socket "$pipe" token 2>&1)"
check "the same program at another path is refused by [[clients]]" "grep -qi 'not listed' <<<'$refused'"
check "the refusal names the caller's path as Windows reports it" "grep -qF 'other\\cis2ctl.exe' <<<'$refused'"
sleep 0.3
check "the audit log records the caller's path" "grep -qF 'bin\\\\cis2ctl.exe' '$data/audit.jsonl'"
check "the audit log records the caller's SHA-256" "grep -qF '$ctl_hash' '$data/audit.jsonl'"

# 4. Restart: the session comes back from Credential Manager without the browser.
kill -9 "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null
check "the agent starts again on the same pipe after being killed" "start_agent '$work/real2' --config '$(win "$work/config.toml")' --socket '$pipe'"
again="$(ctl token 2>/dev/null)"
check "after the restart the same token comes back (Credential Manager + session.bin)" "[ -n '$again' ] && [ '$again' = '$token' ]"
opened="$(grep -c . "$work/browser.log" 2>/dev/null)"
check "the browser was opened three times in all (sandbox, its unlock, provider), not again after the restart ($opened)" "[ '$opened' = 3 ]"
check "cis2ctl.exe logout" "ctl logout >/dev/null 2>&1"
check "after logout nobody is signed in" "! ctl token >/dev/null 2>&1"

echo "windows e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
