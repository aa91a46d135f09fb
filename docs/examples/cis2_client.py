#!/usr/bin/env python3
"""A small client for the cis2-agent local socket, using the Python 3 standard library only.

The protocol is JSON-RPC 2.0, one JSON object per line (see docs/ipc.md).

Run it against a running agent:

    python3 cis2_client.py /path/to/agent.sock
    CIS2_AGENT_SOCK=/path/to/agent.sock python3 cis2_client.py

It subscribes to events, asks for status, signs in (this opens the browser), asks who is signed in
and fetches an access token. It prints the token's length and expiry, never the token itself.

Before sending anything it checks that the socket's folder is the user's own (mode 0700) and that the
program listening runs as the user (SO_PEERCRED): on a shared computer another user could otherwise
put a fake agent where the real one would be.

Exit codes: 0 done; 1 the agent answered with an error, or the socket is not the user's own agent;
3 no agent at the socket.
"""

import collections
import json
import os
import socket
import stat
import struct
import sys
import time


class AgentError(Exception):
    """The agent answered with a JSON-RPC error. `code` is one of the codes in docs/ipc.md."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class NotYourAgent(Exception):
    """The socket's folder or the program listening there is not this user's own: nothing was sent."""


def default_socket_path():
    """The rule of docs/ipc.md ("Where the socket is"), the same as the agent's:
    $CIS2_AGENT_SOCK, else $XDG_RUNTIME_DIR/cis2-agent/agent.sock, else /tmp/cis2-agent-<uid>/agent.sock
    unless that folder exists and is not this user's own folder, then $HOME/.cache/cis2-agent/agent.sock."""
    path = os.environ.get("CIS2_AGENT_SOCK")
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "cis2-agent", "agent.sock")
    shared = "/tmp/cis2-agent-%d" % os.getuid()
    home = os.environ.get("HOME")
    try:
        held = os.lstat(shared)
        squatted = not stat.S_ISDIR(held.st_mode) or held.st_uid != os.getuid()
    except FileNotFoundError:
        squatted = False
    if squatted and home and os.path.isabs(home):
        return os.path.join(home, ".cache", "cis2-agent", "agent.sock")
    return os.path.join(shared, "agent.sock")


def check_socket_folder(path):
    """Before sending anything: the socket's folder must be this user's own, mode 0700."""
    folder = os.path.dirname(os.path.abspath(path))
    info = os.lstat(folder)  # FileNotFoundError: no agent
    if not stat.S_ISDIR(info.st_mode):
        raise NotYourAgent("the agent's socket folder %s is not a folder (owned by uid %d); nothing was sent"
                           % (folder, info.st_uid))
    if info.st_uid != os.geteuid():
        raise NotYourAgent("the agent's socket folder %s belongs to uid %d, not to you (uid %d): it may be "
                           "another user's fake agent, so nothing was sent" % (folder, info.st_uid, os.geteuid()))
    if info.st_mode & 0o077:
        raise NotYourAgent("the agent's socket folder %s is open to other users (mode %o; it must be 700); "
                           "nothing was sent" % (folder, stat.S_IMODE(info.st_mode)))


def check_server_user(sock, path):
    """After connecting, before sending: the listening process must run as this user (SO_PEERCRED, Linux)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.geteuid():
        raise NotYourAgent("the program listening at %s runs as uid %d, not as you: it is not your agent, "
                           "so nothing was sent" % (path, uid))


class Cis2Agent:
    """One connection to the agent. Not thread-safe: use one object per thread."""

    def __init__(self, path, timeout=30.0):
        check_socket_folder(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            check_server_user(self._sock, path)
        except BaseException:
            self._sock.close()
            raise
        self._timeout = timeout
        self._buffer = bytearray()
        self._next_id = 1
        # Events that arrived while we waited for an answer, oldest first.
        self.events = collections.deque()

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_message(self):
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line.decode("utf-8"))

    def call(self, method, params=None, timeout=None):
        """Calls `method` and returns its result; raises AgentError on an error answer.

        `timeout`: seconds to wait for the answer (None: the connection's default). `login`
        waits for the person in the browser, so give it several minutes.
        """
        request_id = self._next_id
        self._next_id += 1
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        line = json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n"
        self._sock.settimeout(self._timeout if timeout is None else timeout)
        try:
            self._sock.sendall(line)
            while True:
                message = self._read_message()
                if message.get("method") == "event":
                    self.events.append(message["params"])
                    continue
                if message.get("id") != request_id:
                    continue  # e.g. an error about a line the agent could not read (id null)
                if "error" in message:
                    raise AgentError(message["error"]["code"], message["error"]["message"])
                return message["result"]
        finally:
            self._sock.settimeout(self._timeout)

    def subscribe(self):
        """Asks for events; read them with next_event() or from self.events."""
        return self.call("subscribe")

    def next_event(self, timeout=None):
        """The next event's params ({"type": ..., ...}); waits up to `timeout` seconds (None: forever)."""
        if self.events:
            return self.events.popleft()
        self._sock.settimeout(timeout)
        try:
            while True:
                message = self._read_message()
                if message.get("method") == "event":
                    return message["params"]
        finally:
            self._sock.settimeout(self._timeout)


def describe_role(role):
    if not role:
        return "none"
    return "%s at %s (%s)" % (role["name"], role.get("org_name") or "unnamed organisation", role["org_code"])


def main(argv):
    path = argv[1] if len(argv) > 1 else default_socket_path()
    try:
        agent = Cis2Agent(path)
    except NotYourAgent as e:
        print(str(e), file=sys.stderr)
        return 1
    except OSError as e:
        print("no agent is listening at %s: %s" % (path, e), file=sys.stderr)
        return 3
    with agent:
        try:
            agent.subscribe()

            status = agent.call("status")
            if status["environment"] == "sandbox":
                print("SANDBOX: not NHS CIS2 (test users only)")
            print("environment: %s, state: %s" % (status["environment"], status["state"]))

            status = agent.call("login", {"timeout_secs": 300}, timeout=330)
            print("after login: %s" % status["state"])

            user = agent.call("whoami")
            print("user: %s (%s)" % (user["name"], user["uid"]))
            print("roles: %d, selected: %s" % (len(user["roles"]), describe_role(user["selected_role"])))
            assurance = user["assurance"]
            print("signed in with: %s (acr %s)" % (", ".join(assurance["amr"]) or "unknown", assurance["acr"]))

            token = agent.call("token", {"min_valid_secs": 60})
            left = token["expires_at"] - int(time.time())
            print("access token: %d characters, %s, expires at %d (in %d s)"
                  % (len(token["access_token"]), token["token_type"], token["expires_at"], left))

            for event in agent.events:
                print("event: %s" % event["type"])
        except AgentError as e:
            print("the agent said (%d): %s" % (e.code, e.message), file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:
            print("the connection to the agent failed: %s" % e, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
