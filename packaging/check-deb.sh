#!/usr/bin/env bash
# Checks a built .deb (default: the one packaging/build-deb.sh made) ships what the desktop app needs
# and that it starts as installed: the launcher the desktop entry runs, the app the launcher starts
# from beside it, the desktop and autostart entries; then, extracted into a temporary folder and run
# under a private Xvfb and D-Bus on the sandbox provider, that the launcher becomes the app beside it,
# the window appears, its WM_CLASS is the desktop entry's StartupWMClass (else docks and taskbars
# show the window apart from the entry), and a second launch hands over to the running app.
# Prints PASS or FAIL per check; exits 1 if any failed. Needs Xvfb, dbus-daemon and python3-xlib
# (scripts/install-deps) and the .deb's dependencies installed.
set -uo pipefail
cd "$(dirname "$0")/.."

deb="${1:-}"
if [ -z "$deb" ]; then
  shopt -s nullglob
  debs=(target/release/bundle/deb/*.deb)
  [ "${#debs[@]}" -eq 1 ] || { echo "usage: $0 <package.deb> (found ${#debs[@]} in target/release/bundle/deb/)" >&2; exit 2; }
  deb="${debs[0]}"
fi
[ -f "$deb" ] || { echo "$0: no such file: $deb" >&2; exit 2; }

failed=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failed=1; }
check() { # check <description> <command...>
  local what="$1"; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

work="$(mktemp -d /tmp/cis2-check-deb-XXXXXX)"
pids=()
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null; done
  sleep 0.5
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -9 "${pids[$i]}" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

root="$work/root"
dpkg-deb -x "$deb" "$root" || { echo "$0: dpkg-deb could not extract $deb" >&2; exit 2; }
echo "checking $deb"
dpkg-deb -c "$deb" | grep -E ' (\./)?usr/(bin|share/applications|share/cis2-agent)/.' | sed 's/^/      /'

# The package's files.
entries=("$root"/usr/share/applications/*.desktop)
if [ "${#entries[@]}" -eq 1 ] && [ -f "${entries[0]}" ]; then
  entry="${entries[0]}"
  pass "one desktop entry: /usr/share/applications/$(basename "$entry")"
else
  fail "one desktop entry in /usr/share/applications (found: ${entries[*]})"
  entry=/dev/null
fi
key() { sed -n "s/^$1=//p" "$2" | head -n 1; }
launcher_name="$(key Exec "$entry" | awk '{print $1}')"
launcher_name="${launcher_name##*/}"
wm_class="$(key StartupWMClass "$entry")"
# The launcher's rule (src-tauri/src/launcher.rs): the app is its own name with -app, beside it.
app_name="${launcher_name}-app"
launcher="$root/usr/bin/$launcher_name"
app="$root/usr/bin/$app_name"
check "the desktop entry runs the launcher, shipped: /usr/bin/$launcher_name" test -n "$launcher_name" -a -x "$launcher"
check "the app the launcher starts is shipped beside it: /usr/bin/$app_name" test -x "$app"
check "the desktop entry names the window's class: StartupWMClass=$wm_class" test -n "$wm_class"
icon="$(key Icon "$entry")"
check "the desktop entry's icon is shipped: Icon=$icon" bash -c "compgen -G '$root/usr/share/icons/hicolor/*/apps/$icon.png' >/dev/null"
autostart="$root/usr/share/cis2-agent/cis2-agent-autostart.desktop"
check "the autostart entry is shipped: /usr/share/cis2-agent/cis2-agent-autostart.desktop" test -f "$autostart"
autostart_exec="$(key Exec "$autostart" 2>/dev/null)"
check "the autostart entry runs the launcher in the tray: Exec=$autostart_exec" test "$autostart_exec" = "$launcher_name --minimized"
# The launcher's point is to start quickly: no GTK or WebKit for the loader to bind.
check "the launcher links neither GTK nor WebKit" bash -c "! ldd '$launcher' | grep -qE 'libgtk|libwebkit'"
check "the package depends on WebKitGTK, GTK, the tray's indicator and PC/SC" bash -c \
  "dpkg-deb -f '$deb' Depends | tr -d ' ' | tr , '\n' | sort | tr '\n' ' ' | grep -q 'libayatana-appindicator3-1 libgtk-3-0 libpcsclite1 libwebkit2gtk-4.1-0'"

if [ ! -x "$launcher" ] || [ ! -x "$app" ]; then
  echo "FAIL  not run: the package lacks the launcher or the app"
  exit 1
fi

# Run it as installed, on the sandbox, on a screen and session bus of its own.
mkdir -m 700 "$work/home" "$work/xdg-run" "$work/xdg-config" "$work/xdg-data" "$work/data"
cat >"$work/config.toml" <<EOF
environment = "sandbox"
[agent]
data_dir = "$work/data"
socket = "$work/run/agent.sock"
EOF
exec {xfd}< <(exec Xvfb -displayfd 1 -screen 0 1280x900x24 -nolisten tcp 2>/dev/null)
pids+=($!)
read -r -t 20 -u "$xfd" number || { echo "FAIL  Xvfb did not start"; exit 1; }
exec {bfd}< <(exec dbus-daemon --session --nofork --print-address=1 2>/dev/null)
pids+=($!)
read -r -t 20 -u "$bfd" bus || { echo "FAIL  dbus-daemon did not start"; exit 1; }
run_env=(env -i PATH=/usr/bin:/bin HOME="$work/home" DISPLAY=":$number" GDK_BACKEND=x11
  DBUS_SESSION_BUS_ADDRESS="$bus" XDG_RUNTIME_DIR="$work/xdg-run" XDG_CONFIG_HOME="$work/xdg-config"
  XDG_DATA_HOME="$work/xdg-data" BROWSER=/bin/true)
"${run_env[@]}" "$launcher" --config "$work/config.toml" >"$work/app.log" 2>&1 &
first=$!
pids+=("$first")

# The window: the top-level window with a title, and its WM_CLASS (Debian's python3-xlib).
window_classes() {
  /usr/bin/python3 - ":$number" <<'EOF'
import sys
from Xlib import display
d = display.Display(sys.argv[1])
name, utf8, pid = d.intern_atom("_NET_WM_NAME"), d.intern_atom("UTF8_STRING"), d.intern_atom("_NET_WM_PID")
for w in d.screen().root.query_tree().children:
    title = w.get_full_property(name, utf8)
    if title is None or not title.value or w.get_attributes().map_state == 0:
        continue
    owner = w.get_full_property(pid, 0)
    print(owner.value[0] if owner else "-", *(w.get_wm_class() or ("-", "-")), title.value.decode(), sep="\t")
EOF
}
windows=""
for _ in $(seq 1 150); do
  windows="$(window_classes 2>/dev/null)"
  [ -n "$windows" ] && break
  kill -0 "$first" 2>/dev/null || break
  sleep 0.2
done
exe_of() { readlink "/proc/$1/exe" 2>/dev/null; }
check "the launcher became the app beside it (pid $first runs $(exe_of "$first"))" test "$(exe_of "$first")" = "$app"
if [ -n "$windows" ]; then
  pass "the window appeared: $(echo "$windows" | cut -f4 | head -n 1)"
else
  fail "the window appeared (within 30 s; the app's log follows)"
  sed 's/^/      /' "$work/app.log"
fi
if [ "$(echo "$windows" | grep -c .)" -eq 1 ]; then
  IFS=$'\t' read -r window_pid instance class _ <<<"$windows"
  check "the window's process is the app beside the launcher ($(exe_of "$window_pid"))" test "$(exe_of "$window_pid")" = "$app"
  # GNOME matches StartupWMClass to WM_CLASS's instance, KDE to its class whatever the case.
  check "the window's WM_CLASS (\"$instance\", \"$class\") matches StartupWMClass=$wm_class" \
    test "$instance" = "$wm_class" -a "${class,,}" = "${wm_class,,}"
elif [ -n "$windows" ]; then
  fail "one window, not: $windows"
fi

# A second launch hands over (D-Bus) and ends; no second app starts.
started=$(date +%s%N)
timeout 20 "${run_env[@]}" "$launcher" --config "$work/config.toml" >"$work/second.log" 2>&1
second=$?
ms=$((($(date +%s%N) - started) / 1000000))
check "a second launch hands over to the running app and exits 0 (exit $second, $ms ms)" test "$second" -eq 0
apps="$(pgrep -f -- "--config $work/config.toml" | while read -r p; do [ "$(exe_of "$p")" = "$app" ] && ! grep -qa -- --window "/proc/$p/cmdline" && echo "$p"; done | grep -c .)"
check "still one app running ($apps)" test "$apps" -eq 1

[ "$failed" -eq 0 ] && echo "all checks passed" || echo "some checks FAILED"
exit "$failed"
