#!/usr/bin/env bash
# The Windows installer under Wine, the way SCCM or Intune runs it: silent install into a throw-away
# prefix (scripts/wine-prefix), the installed programs answering over the named pipe, a reinstall with
# start at sign-in, and the silent uninstall registered in Add/Remove Programs. The admin's
# machine-wide config must survive all of it untouched.
# Usage: scripts/windows/installer.sh [SETUP.exe]
#   without an argument, builds the debug installer first (scripts/windows/build-installer --debug:
#   CI's choice, see docs/deployment.md); set CARGO_LOCK as for that script.
# Each check prints "ok - …" or "FAIL - …"; the last line is "windows installer: N passed, M failed"
# and the exit status is non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ $# -gt 0 ]; then
  setup="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
else
  setup="$PWD/$(scripts/windows/build-installer --debug)" || exit 1
fi
[ -f "$setup" ] || { echo "FAIL - no installer at $setup"; exit 1; }

prefix="$(scripts/wine-prefix)" || { echo "FAIL - could not make a Wine prefix"; exit 1; }
export WINEPREFIX="$prefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
unset DISPLAY CIS2_AGENT_SOCK CIS2_AGENT_CONFIG
work="$(mktemp -d "${TMPDIR:-/tmp}/cis2-win-installer.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  wineserver -k 2>/dev/null
  rm -rf "$work" "$prefix"
}
trap cleanup EXIT
passed=0 failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1"; failed=$((failed + 1)); }
check() { if eval "$2"; then ok "$1"; else fail "$1"; return 1; fi; }

c="$prefix/drive_c"
app="$c/Program Files/CIS2 Agent"
shortcut="$c/ProgramData/Microsoft/Windows/Start Menu/Programs/CIS2 Agent.lnk"
config="$c/ProgramData/cis2-agent/config.toml"
uninstall_key='HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall\CIS2 Agent'
run_key='HKLM\Software\Microsoft\Windows\CurrentVersion\Run'
installed=(cis2-agent.exe WebView2Loader.dll cis2-agentd.exe cis2ctl.exe uninstall.exe)
# A registry value's data (REG_SZ or REG_DWORD), or nothing (and false) when it is not there.
reg_value() { wine reg query "$1" /v "$2" 2>/dev/null | tr -d '\r' | sed -n "s/^ *$2 *REG_[A-Z_]* *//p" | grep .; }
all_installed() { for f in "${installed[@]}"; do [ -s "$app/$f" ] || return 1; done; }
none_installed() { for f in "${installed[@]}"; do [ ! -e "$app/$f" ] || return 1; done; }
ctl() { wine "$app/cis2ctl.exe" "$@"; }

# True once FILE has a line matching PATTERN; false if process PID ends first, or after 30 s.
says() { timeout 30 grep -q -m1 "$2" <(tail -n +1 -s 0.1 -F --pid="$3" "$1" 2>/dev/null); }
# Starts the installed cis2-agentd.exe with ARGS, until it listens; sets $agent_pid.
start_agent() {
  local log="$1"; shift
  wine "$app/cis2-agentd.exe" "$@" >"$log.out" 2>"$log.err" &
  agent_pid=$!
  pids+=("$agent_pid")
  says "$log.out" "^listening on" "$agent_pid"
}

# 1. A silent per-machine install.
check "the installer runs silently (/S) and exits 0" "wine '$setup' /S"
check "it installs ${installed[*]} into Program Files" "all_installed"
check "a Start-menu entry for every user" "[ -s '$shortcut' ]"
check "Add/Remove Programs lists CIS2 Agent" "[ \"\$(reg_value '$uninstall_key' DisplayName)\" = 'CIS2 Agent' ]"
quiet="$(reg_value "$uninstall_key" QuietUninstallString)"
check "with a silent uninstall command ($quiet)" "[ \"\$quiet\" = '\"C:\\Program Files\\CIS2 Agent\\uninstall.exe\" /S' ]"
check "start at sign-in is off unless asked for" "! reg_value '$run_key' 'CIS2 Agent' >/dev/null"
check "the machine-wide config folder is there, with no config in it" "[ -d '${config%/*}' ] && [ ! -e '$config' ]"
version="$(grep -m1 '^version = ' Cargo.toml | cut -d'"' -f2)"
# Asked twice at most: the first GUI program Wine starts right after a silent install has once
# printed nothing (1 run in 4 on the CI machine, the same build passing before and after); a program
# that does not run fails both times, and what Wine said is shown.
app_version() { wine "$app/cis2-agent.exe" --version 2>"$work/version.err" | tr -d '\r' | grep -qx "cis2-agent $version"; }
check "the installed desktop app runs: cis2-agent.exe --version says $version" \
  "app_version || app_version || { sed 's/^/  wine: /' '$work/version.err'; false; }"

# 2. The installed agent answers on its default pipe (\\.\pipe\cis2-agent-<SID>).
check "the installed cis2-agentd.exe --sandbox starts" "start_agent '$work/sandbox' --sandbox"
check "on the user's default pipe" "grep -q 'listening on \\\\\\\\.\\\\pipe\\\\cis2-agent-S-1-5-' '$work/sandbox.out'"
status="$(ctl status --json 2>&1)"
check "the installed cis2ctl.exe status answers over it: sandbox, signed out" \
  "grep -q '\"environment\": *\"sandbox\"' <<<'$status' && grep -q '\"state\": *\"signed_out\"' <<<'$status'"
kill -9 "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null

# The desktop app's long-lived process (the agent and the tray icon; no WebView2, which only the
# window process needs) runs under Wine too. Its tray needs a display: a private Xvfb.
if ! command -v Xvfb >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq xvfb
fi
Xvfb -displayfd 3 -screen 0 1024x768x24 -nolisten tcp 3>"$work/display" >/dev/null 2>&1 &
pids+=($!)
says "$work/display" . "$!"
tray_pipe='\\.\pipe\cis2-installer-tray'
# The tray lives in Wine's desktop process (explorer.exe), which the first program of a session starts
# with that program's display: let the headless session end so that the app starts a new one.
timeout 60 wineserver -w
DISPLAY=":$(cat "$work/display")" wine "$app/cis2-agent.exe" --sandbox --minimized --socket "$tray_pipe" \
  >"$work/tray.out" 2>"$work/tray.err" &
tray_pid=$!
pids+=("$tray_pid")
# A tray that fails panics, and Wine may keep the process about: stop waiting at the panic too.
says "$work/tray.err" "tray icon shown\|panicked" "$tray_pid"
check "the installed desktop app starts in the tray (--minimized, Xvfb)" \
  "grep -q 'tray icon shown' '$work/tray.err'" || sed 's/^/# /' "$work/tray.err"
check "with its agent on the pipe" "grep -qF 'listening on $tray_pipe' '$work/tray.out'"
tray_status="$(ctl --socket "$tray_pipe" status --json 2>&1)"
check "the installed cis2ctl.exe status answers the desktop app" \
  "grep -q '\"environment\": *\"sandbox\"' <<<'$tray_status'"
kill -9 "$tray_pid" 2>/dev/null; wait "$tray_pid" 2>/dev/null

# A config mistake, as an app started from the Start menu meets it: its error line reaches nobody, so
# it says so in a message box, and exits 2 once the person closes the box.
title='CIS2 Agent could not start'
# Finds (or, with "close", asks to close, as a title bar's close button does) the X windows titled
# $2 on this test's display; false when there is none.
x_window() {
  /usr/bin/python3 - ":$(cat "$work/display")" "$1" "$2" <<'PY'
import sys
from Xlib import X, display, protocol
d = display.Display(sys.argv[1])
name, utf8 = d.intern_atom("_NET_WM_NAME"), d.intern_atom("UTF8_STRING")
protocols, delete = d.intern_atom("WM_PROTOCOLS"), d.intern_atom("WM_DELETE_WINDOW")
found = False
for w in d.screen().root.query_tree().children:
    title = w.get_full_property(name, utf8)
    if title is not None and title.value.decode() == sys.argv[3]:
        found = True
        if sys.argv[2] == "close":
            message = protocol.event.ClientMessage(window=w, client_type=protocols,
                                                   data=(32, [delete, X.CurrentTime, 0, 0, 0]))
            w.send_event(message, event_mask=X.NoEventMask)
d.flush()
sys.exit(0 if found else 1)
PY
}
# Starts the installed app with ARGS (which must make it fail) on the display; checks that a message
# box titled $title appears and that the app waits for it; closes it; sets $box_code (the app's exit
# code) with its stderr in $work/box.err.
fail_with_a_box() {
  local what="$1"; shift
  DISPLAY=":$(cat "$work/display")" wine "$app/cis2-agent.exe" "$@" >/dev/null 2>"$work/box.err" &
  local pid=$!
  pids+=("$pid")
  box_shown() {
    for _ in $(seq 600); do
      x_window find "$title" && return 0
      kill -0 "$pid" 2>/dev/null || return 1
      sleep 0.1
    done
    return 1
  }
  check "$what: the installed app says so in a message box titled '$title'" "box_shown" ||
    sed 's/^/# /' "$work/box.err"
  check "and waits for the person to close it" "sleep 1 && kill -0 $pid 2>/dev/null"
  x_window close "$title"
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  wait "$pid" 2>/dev/null
  box_code=$?
}
printf 'environment = "custom"\n' >"$work/bad.toml"
fail_with_a_box "a config mistake" --config "$(winepath -w "$work/bad.toml" 2>/dev/null)"
check "closed, it exits 2 ($box_code), its error line naming the file, line 1 and the fix" \
  "[ $box_code = 2 ] && grep -q 'bad.toml:1: environment = \"custom\" needs a \\[provider\\] section' '$work/box.err'" ||
  sed 's/^/# /' "$work/box.err"
fail_with_a_box "an option mistyped in a shortcut (--minimised)" --minimised
check "closed, it exits 2 ($box_code), naming the option and the one meant" \
  "[ $box_code = 2 ] && grep -q \"unexpected argument '--minimised'\" '$work/box.err' && grep -q \"'--minimized'\" '$work/box.err'" ||
  sed 's/^/# /' "$work/box.err"

# 3. The admin drops a machine-wide config (as Group Policy or Intune would), then reinstalls with
#    start at sign-in: the config stays byte for byte, and the installed agent reads it.
pipe='\\.\pipe\cis2-installer-machine-config'
printf '%s\n' '# The admin'"'"'s: no install or uninstall may touch it.' 'environment = "sandbox"' \
  '[agent]' "socket = '$pipe'" >"$config"
cp "$config" "$work/config.toml"
check "a reinstall over it, silent with /AUTOSTART, exits 0" "wine '$setup' /S /AUTOSTART"
check "the admin's config is unchanged" "cmp -s '$config' '$work/config.toml'"
run="$(reg_value "$run_key" 'CIS2 Agent')"
check "start at sign-in: the machine's Run key starts the app in the tray ($run)" \
  "[ \"\$run\" = '\"C:\\Program Files\\CIS2 Agent\\cis2-agent.exe\" --minimized' ]"
check "an upgrade with plain /S keeps start at sign-in" \
  "wine '$setup' /S && [ \"\$(reg_value '$run_key' 'CIS2 Agent')\" = \"\$run\" ]"
check "/AUTOSTART=0 turns it off" "wine '$setup' /S /AUTOSTART=0 && ! reg_value '$run_key' 'CIS2 Agent' >/dev/null"
check "/AUTOSTART turns it on again" "wine '$setup' /S /AUTOSTART && reg_value '$run_key' 'CIS2 Agent' >/dev/null"
check "the admin's config is still unchanged after three more installs" "cmp -s '$config' '$work/config.toml'"
check "the installed cis2-agentd.exe, with no options, reads the machine-wide config" \
  "start_agent '$work/machine' && grep -qF 'listening on $pipe' '$work/machine.out'"
check "and the installed cis2ctl.exe finds it through the same config" "ctl status >/dev/null 2>&1"

# 4. The silent uninstall, as Add/Remove Programs registered it, with the agent still running.
exe="${quiet#\"}" exe="${exe%%\"*}"
wine "$exe" /S
# The uninstaller runs on from a copy of itself in %TEMP%: done when every program in the prefix is.
check "the silent uninstall finishes (every process in the prefix ends within 60 s)" "timeout 60 wineserver -w"
check "it stopped the running agent" "! kill -0 $agent_pid 2>/dev/null"
check "the installed files are gone" "none_installed"
check "and the install folder" "[ ! -e '$app' ]"
check "the Start-menu entry is gone" "[ ! -e '$shortcut' ]"
check "Add/Remove Programs no longer lists it" "! reg_value '$uninstall_key' DisplayName >/dev/null"
check "start at sign-in is gone" "! reg_value '$run_key' 'CIS2 Agent' >/dev/null"
check "the admin's config is still there, unchanged" "cmp -s '$config' '$work/config.toml'"

echo "windows installer: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
