#!/usr/bin/env bash
# Sets up oidc-agent (Debian `oidc-agent-cli` 4.2.6) against the sandbox provider cis2-mock-idp without a
# person, so that `oidc-token cis2bench` serves a cached access token from oidc-agent's socket.
#
#   bench/oidc-agent-setup.sh ISSUER WORKDIR    # prints `export ...` lines on stdout, progress on stderr
#   eval "$(bench/oidc-agent-setup.sh "$ISSUER" "$WD")" && oidc-token cis2bench
#
# Everything lives in WORKDIR (agent socket, OIDC_CONFIG_DIR, encryption password, logs, shims); nothing
# is written under ~. It leaves running: oidc-agent (OIDCD_PID; the daemon puts itself and its helpers, e.g.
# the redirect web server it forks for a code flow, in its own process group OIDC_BENCH_AGENT_PGID) and the
# token-auth shim (OIDC_BENCH_SHIM_PID). Stop them by id when done:
#   kill -- "-$OIDC_BENCH_AGENT_PGID"; kill "$OIDC_BENCH_SHIM_PID"
#
# Why the shims (details: bench/README-oidc-agent.md):
#  * oidc-agent 4.2.6 authenticates every token request (code exchange, refresh, revocation) with HTTP Basic
#    only (`Authorization: Basic base64(client_id:secret)`, empty secret for a public client) and never puts
#    client_id in the form body. cis2-mock-idp supports private_key_jwt, client_secret_post and none, reads
#    client_id from the body only, and answers `invalid_client: no client authentication was given`. So,
#    unless the provider's discovery lists client_secret_basic, a loopback "token-auth shim" sits in front
#    of the token and revocation endpoints only: it moves the Basic credentials into the form body
#    (client_id, plus client_secret when non-empty) and forwards to the provider. Discovery, /authorize,
#    the login pages, userinfo and JWKS stay the provider's own. A cached `oidc-token` never reaches it.
#  * oidc-agent 4.2.6 always adds `offline_access` to the authorization request's scope (only Google is
#    exempt); cis2-mock-idp rejects unknown scopes (invalid_scope). The stand-in browser (an `xdg-open`
#    first on PATH for oidc-gen, which runs cis2-scripted-browser) drops `offline_access` from the URL.
#    Refresh requests also carry `scope=... offline_access`; the provider ignores scope on refresh.
#
# Environment knobs (all optional):
#   CIS2_BIN_DIR          where cis2-scripted-browser is (default: <repo>/target/debug)
#   CIS2_TEST_USER        test user uid to sign in as (default 555021935108)
#   CIS2_TEST_AUTHENTICATOR  (default smartcard); CIS2_TEST_ROLE (default: first role offered)
#   OIDC_BENCH_ACCOUNT    oidc-agent account short name (default cis2bench)
#   OIDC_BENCH_CLIENT_ID  client_id registered at the provider (default oidc-agent-bench)
#   OIDC_BENCH_SCOPE      scope (default "openid profile"); must be scopes cis2-mock-idp knows
#   OIDC_BENCH_REDIRECT_PORT  port of oidc-agent's loopback redirect (default: a free one)
#   OIDC_BENCH_REGISTER   1 (default): register the client through the provider's loopback admin API
#                         (POST /admin/clients); 0: it is already registered (with redirect URI
#                         http://localhost:$OIDC_BENCH_REDIRECT_PORT, auth_method none, refresh_tokens)
#   OIDC_BENCH_SHIM       auto (default: shim unless discovery lists client_secret_basic), 1, or 0
set -euo pipefail

die() { echo "oidc-agent-setup: $*" >&2; exit 1; }
say() { echo "oidc-agent-setup: $*" >&2; }

[ $# -eq 2 ] || die "usage: $0 ISSUER WORKDIR"
ISSUER=${1%/}
WD=$2

HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=${CIS2_BIN_DIR:-$HERE/../target/debug}
BROWSER_BIN=$BIN_DIR/cis2-scripted-browser
ACCOUNT=${OIDC_BENCH_ACCOUNT:-cis2bench}
CLIENT_ID=${OIDC_BENCH_CLIENT_ID:-oidc-agent-bench}
SCOPE=${OIDC_BENCH_SCOPE:-openid profile}
REGISTER=${OIDC_BENCH_REGISTER:-1}
SHIM_MODE=${OIDC_BENCH_SHIM:-auto}

for tool in oidc-agent oidc-gen oidc-add oidc-token curl python3 timeout; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y oidc-agent-cli curl python3 coreutils)"
done
[ -x "$BROWSER_BIN" ] || die "$BROWSER_BIN not found: set CIS2_BIN_DIR to where cis2-scripted-browser is"

mkdir -p "$WD"
WD=$(cd "$WD" && pwd)
CONFIG_DIR=$WD/oidc-config
SOCK=$WD/oidc-agent.sock
[ -e "$SOCK" ] && die "$SOCK exists: another agent may be using $WD; use a fresh WORKDIR"
mkdir -p "$CONFIG_DIR" "$WD/bin"
chmod 700 "$WD" "$CONFIG_DIR"

# ---- the provider -------------------------------------------------------------------------------------
DISCOVERY_JSON=$(curl -fsS "$ISSUER/.well-known/openid-configuration") \
  || die "no discovery document at $ISSUER/.well-known/openid-configuration"
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); v=d.get(sys.argv[1]); print(" ".join(v) if isinstance(v,list) else (v or ""))' "$1" <<<"$DISCOVERY_JSON"; }
AUTH_METHODS=$(json token_endpoint_auth_methods_supported)
PKCE_METHODS=$(json code_challenge_methods_supported)
say "provider token auth methods: [$AUTH_METHODS]; PKCE: [$PKCE_METHODS]"
case " $PKCE_METHODS " in *" S256 "*) ;; *) say "warning: discovery does not list PKCE S256; oidc-agent uses the first method it lists";; esac
if [ "$SHIM_MODE" = auto ]; then
  case " $AUTH_METHODS " in *" client_secret_basic "*) SHIM_MODE=0 ;; *) SHIM_MODE=1 ;; esac
fi
ORIGIN=$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(f"{p.scheme}://{p.netloc}")' "$ISSUER")

# ---- oidc-agent's redirect URI ------------------------------------------------------------------------
# oidc-gen only accepts http://localhost:<port>[/*]; cis2-mock-idp's any-port rule covers IP literals
# (http://127.0.0.1/...) only, so the exact URI with its port is registered.
# oidc-gen also wants the port in 1024..49151, below Linux's ephemeral range, so pick a free one there.
REDIRECT_PORT=${OIDC_BENCH_REDIRECT_PORT:-$(python3 -c '
import random, socket
for port in random.sample(range(20000, 49152), 200):
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s:
                s.bind((host, port))
    except OSError:
        continue
    print(port)
    break')}
[ -n "$REDIRECT_PORT" ] || die "no free port for the redirect URI"
REDIRECT_URI=http://localhost:$REDIRECT_PORT

CLIENT_SECRET=""
if [ "$SHIM_MODE" = 1 ]; then
  AUTH_METHOD=none
else
  # The provider lists client_secret_basic: a confidential client, no shim. (Untested: cis2-mock-idp
  # does not offer client_secret_basic at the time of writing.)
  AUTH_METHOD=client_secret_basic
  CLIENT_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
fi

if [ "$REGISTER" = 1 ]; then
  CLIENT_JSON=$(python3 -c '
import json, sys
client_id, method, secret, redirect = sys.argv[1:5]
c = {"client_id": client_id, "name": "oidc-agent 4.2.6 (benchmark)", "auth_method": method,
     "redirect_uris": [redirect, redirect + "/"], "refresh_tokens": True, "rotate_refresh_tokens": False}
if secret: c["client_secret"] = secret
print(json.dumps(c))' "$CLIENT_ID" "$AUTH_METHOD" "$CLIENT_SECRET" "$REDIRECT_URI")
  curl -fsS -X POST -H 'content-type: application/json' --data "$CLIENT_JSON" "$ORIGIN/admin/clients" >/dev/null \
    || die "registering $CLIENT_ID at $ORIGIN/admin/clients failed"
  say "registered client $CLIENT_ID (auth_method $AUTH_METHOD, redirect_uri $REDIRECT_URI) via $ORIGIN/admin/clients"
fi

STARTED_PIDS=()
AGENT_PGID=""
cleanup_on_error() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    if [ -n "$AGENT_PGID" ]; then kill -- "-$AGENT_PGID" 2>/dev/null || true; fi
    for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    say "failed (rc $rc); logs in $WD"
  fi
}
trap cleanup_on_error EXIT

# ---- token-auth shim (client_secret_basic -> form body) ------------------------------------------------
ACCOUNT_ISSUER=$ISSUER
SHIM_PID=""
if [ "$SHIM_MODE" = 1 ]; then
  cat >"$WD/token-auth-shim.py" <<'PY'
# Loopback shim for the oidc-agent benchmark: serves the provider's discovery document with the token and
# revocation endpoints pointing here, and forwards those two POSTs to the provider with the client's HTTP
# Basic credentials moved into the form body (client_id, plus client_secret when not empty).
import base64, http.server, json, socketserver, sys, urllib.error, urllib.parse, urllib.request

ISSUER = sys.argv[1].rstrip("/")
REALM = urllib.parse.urlsplit(ISSUER).path
UPSTREAM = json.load(urllib.request.urlopen(ISSUER + "/.well-known/openid-configuration"))
ROUTES = {}  # local path -> upstream URL

class Shim(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body, content_type="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.split("?")[0] != REALM + "/.well-known/openid-configuration":
            return self.reply(404, b'{"error":"not_found"}')
        doc = dict(UPSTREAM)
        here = "http://127.0.0.1:%d" % self.server.server_address[1]
        for key in ("token_endpoint", "revocation_endpoint"):
            if doc.get(key):
                local = urllib.parse.urlsplit(doc[key]).path
                ROUTES[local] = UPSTREAM[key]
                doc[key] = here + local
        self.reply(200, json.dumps(doc).encode())

    def do_POST(self):
        target = ROUTES.get(self.path.split("?")[0])
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if target is None:
            return self.reply(404, b'{"error":"not_found"}')
        form = body.decode("utf-8", "replace")
        auth = self.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            user, _, secret = base64.b64decode(auth[6:].strip()).decode().partition(":")
            extra = {"client_id": urllib.parse.unquote_plus(user)}
            if secret:
                extra["client_secret"] = urllib.parse.unquote_plus(secret)
            form = (form + "&" if form else "") + urllib.parse.urlencode(extra)
        request = urllib.request.Request(target, data=form.encode(), method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, data, ctype = r.status, r.read(), r.headers.get("Content-Type")
        except urllib.error.HTTPError as e:
            status, data, ctype = e.code, e.read(), e.headers.get("Content-Type")
        self.reply(status, data, ctype, [("Cache-Control", "no-store")])

    def log_message(self, fmt, *args):
        sys.stderr.write("token-auth-shim: " + (fmt % args) + "\n")

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

server = Server(("127.0.0.1", 0), Shim)
print(server.server_address[1], flush=True)
server.serve_forever()
PY
  rm -f "$WD/shim.port"
  python3 "$WD/token-auth-shim.py" "$ISSUER" >"$WD/shim.port" 2>"$WD/shim.log" </dev/null &
  SHIM_PID=$!
  STARTED_PIDS+=("$SHIM_PID")
  for _ in $(seq 50); do [ -s "$WD/shim.port" ] && break; sleep 0.1; done
  SHIM_PORT=$(head -1 "$WD/shim.port")
  [ -n "$SHIM_PORT" ] || die "the token-auth shim did not start (see $WD/shim.log)"
  ACCOUNT_ISSUER="http://127.0.0.1:$SHIM_PORT$(python3 -c 'import sys,urllib.parse as u; print(u.urlsplit(sys.argv[1]).path)' "$ISSUER")"
  say "token-auth shim pid $SHIM_PID at $ACCOUNT_ISSUER (token + revocation endpoints only)"
fi

# ---- stand-in browser for oidc-gen ---------------------------------------------------------------------
cat >"$WD/bin/xdg-open" <<EOF
#!/bin/sh
# oidc-gen runs 'xdg-open URL'; sign in at the sandbox with cis2-scripted-browser instead of a person.
# oidc-agent 4.2.6 always adds offline_access to the scope, which cis2-mock-idp rejects: drop it.
url=\$(printf '%s' "\$1" | sed -e 's/%20offline_access//g' -e 's/offline_access%20//g' -e 's/+offline_access//g' -e 's/offline_access+//g')
printf '%s\n' "\$url" >>"$WD/browser-urls.log"
CIS2_TEST_USER="${CIS2_TEST_USER:-555021935108}" CIS2_TEST_AUTHENTICATOR="${CIS2_TEST_AUTHENTICATOR:-smartcard}" \\
CIS2_TEST_ROLE="${CIS2_TEST_ROLE:-}" exec "$BROWSER_BIN" "\$url" >>"$WD/browser.log" 2>&1
EOF
chmod +x "$WD/bin/xdg-open"

# ---- the agent -----------------------------------------------------------------------------------------
export OIDC_CONFIG_DIR=$CONFIG_DIR
AGENT_JSON=$(oidc-agent --no-autoload --no-autoreauthenticate --socket-path="$SOCK" --json </dev/null)
OIDCD_PID=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["dpid"])' <<<"$AGENT_JSON")
STARTED_PIDS+=("$OIDCD_PID")
# The daemon runs in a session of its own (setsid): its process group holds only oidc-agent processes.
AGENT_PGID=$(ps -o pgid= -p "$OIDCD_PID" | tr -d ' ')
[ -n "$AGENT_PGID" ] && [ "$AGENT_PGID" != "$(ps -o pgid= -p $$ | tr -d ' ')" ] || AGENT_PGID=""
export OIDC_SOCK=$SOCK OIDCD_PID
say "oidc-agent pid $OIDCD_PID (process group ${AGENT_PGID:-?}), socket $SOCK"

# ---- the account: oidc-agent's own authorization code flow (PKCE S256) ---------------------------------
PW_FILE=$WD/encryption-password
( umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$PW_FILE" )
say "oidc-gen $ACCOUNT: code flow at $ISSUER as ${CIS2_TEST_USER:-555021935108}/${CIS2_TEST_AUTHENTICATOR:-smartcard}"
if ! PATH="$WD/bin:$PATH" timeout 120 oidc-gen "$ACCOUNT" \
    --issuer="$ACCOUNT_ISSUER" --client-id="$CLIENT_ID" --client-secret="$CLIENT_SECRET" \
    --redirect-uri="$REDIRECT_URI" --flow=code --scope="$SCOPE" \
    --pw-file="$PW_FILE" --prompt=none --confirm-default </dev/null >"$WD/oidc-gen.log" 2>&1; then
  cat "$WD/oidc-gen.log" >&2
  die "oidc-gen failed (browser log: $WD/browser.log)"
fi
oidc-add --loaded 2>/dev/null | grep -qx "$ACCOUNT" || die "$ACCOUNT is not loaded in oidc-agent"
oidc-token "$ACCOUNT" >/dev/null || die "oidc-token $ACCOUNT failed"
say "account $ACCOUNT loaded; oidc-token works"

trap - EXIT
cat <<EOF
export OIDC_SOCK='$SOCK'
export OIDCD_PID='$OIDCD_PID'
export OIDC_BENCH_AGENT_PGID='$AGENT_PGID'
export OIDC_CONFIG_DIR='$CONFIG_DIR'
export OIDC_BENCH_ACCOUNT='$ACCOUNT'
export OIDC_BENCH_SHIM_PID='$SHIM_PID'
export OIDC_BENCH_ACCOUNT_ISSUER='$ACCOUNT_ISSUER'
export OIDC_BENCH_PW_FILE='$PW_FILE'
EOF
