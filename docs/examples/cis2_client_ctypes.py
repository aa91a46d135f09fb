#!/usr/bin/env python3
"""The cis2_client C library from Python through ctypes (standard library only).

    python3 cis2_client_ctypes.py [ENDPOINT]

Loads libcis2_client.so (cis2_client.dll on Windows; $CIS2_CLIENT_LIBRARY to name the file), prints the
agent's state, signs in if nobody is (the agent opens the browser), prints the user, the selected role
and the token's length (never the token), and waits for events. If $CIS2_TEST_LOGOUT_CMD is set it runs
it and waits for the signed_out event (the project's test does that). Exit 0 when all went well.
"""

import ctypes
import json
import os
import subprocess
import sys
import threading

CIS2_OK = 0
CIS2_E_NOT_SIGNED_IN = 1
CIS2_E_BUFFER_TOO_SMALL = 7

EVENT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


class Cis2Error(Exception):
    def __init__(self, code, message):
        super().__init__("%s (code %d)" % (message, code))
        self.code = code


class Cis2Client:
    """One handle; its methods may be called from several threads."""

    def __init__(self, endpoint=None, library=None):
        name = library or os.environ.get("CIS2_CLIENT_LIBRARY") or (
            "cis2_client.dll" if os.name == "nt" else "libcis2_client.so")
        lib = self._lib = ctypes.CDLL(name)
        size_p = ctypes.POINTER(ctypes.c_size_t)
        lib.cis2_open.restype = ctypes.c_void_p
        lib.cis2_open.argtypes = [ctypes.c_char_p]
        lib.cis2_close.argtypes = [ctypes.c_void_p]
        lib.cis2_last_error.restype = ctypes.c_char_p
        lib.cis2_version.restype = ctypes.c_char_p
        for name in ("cis2_status_json", "cis2_whoami_json"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, size_p]
        for name in ("cis2_get_token", "cis2_get_token_no_auth"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t, size_p]
        lib.cis2_subscribe.argtypes = [ctypes.c_void_p, EVENT_CALLBACK, ctypes.c_void_p]
        self._handle = lib.cis2_open(endpoint.encode() if endpoint else None)
        if not self._handle:
            raise Cis2Error(6, lib.cis2_last_error().decode())
        self._callback = None  # kept alive while the library may call it

    def close(self):
        if self._handle:
            self._lib.cis2_close(self._handle)
            self._handle = None

    def _text(self, call, *args):
        """Calls with a 4 KiB buffer, and again with the size the library asks for if that is too small."""
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            used = ctypes.c_size_t(0)
            rc = call(self._handle, *args, buf, size, ctypes.byref(used))
            if rc == CIS2_E_BUFFER_TOO_SMALL:
                size = used.value
                continue
            if rc != CIS2_OK:
                raise Cis2Error(rc, self._lib.cis2_last_error().decode())
            return buf.value.decode("utf-8")

    def status(self):
        return json.loads(self._text(self._lib.cis2_status_json))

    def whoami(self):
        return json.loads(self._text(self._lib.cis2_whoami_json))

    def get_token(self, min_valid_secs=60):
        return self._text(self._lib.cis2_get_token, min_valid_secs)

    def get_token_no_auth(self, min_valid_secs=60):
        return self._text(self._lib.cis2_get_token_no_auth, min_valid_secs)

    def subscribe(self, on_event):
        """on_event(dict) runs on the library's thread."""
        self._callback = EVENT_CALLBACK(lambda text, _user: on_event(json.loads(text.decode("utf-8"))))
        rc = self._lib.cis2_subscribe(self._handle, self._callback, None)
        if rc != CIS2_OK:
            raise Cis2Error(rc, self._lib.cis2_last_error().decode())


def main(argv):
    endpoint = argv[1] if len(argv) > 1 else None
    client = Cis2Client(endpoint)
    events, arrived = [], threading.Condition()

    def on_event(event):
        with arrived:
            events.append(event["type"])
            arrived.notify_all()

    def wait_for(kind):
        with arrived:
            return arrived.wait_for(lambda: kind in events, timeout=60)

    try:
        client.subscribe(on_event)
        status = client.status()
        banner = " (sandbox: NOT NHS CIS2)" if status["environment"] == "sandbox" else ""
        print("state: %s%s" % (status["state"], banner))
        token = client.get_token(60)  # signs in (the browser) if nobody is
        user = client.whoami()
        print("user: %s (%s)" % (user["name"], user["uid"]))
        role = user["selected_role"]
        print("role: %s at %s" % (role["name"], role["org_code"]) if role else "role: none selected")
        print("token: %d characters" % len(token))
        small = ctypes.create_string_buffer(8)
        used = ctypes.c_size_t(0)
        rc = client._lib.cis2_get_token_no_auth(client._handle, 60, small, 8, ctypes.byref(used))
        print("buffer too small: %d, needs %d" % (rc, used.value))
        if wait_for("signed_in"):
            print("event: signed_in")
        if os.environ.get("CIS2_TEST_LOGOUT_CMD"):
            subprocess.run(os.environ["CIS2_TEST_LOGOUT_CMD"], shell=True, check=True)
            if wait_for("signed_out"):
                print("event: signed_out")
            try:
                client.get_token_no_auth()
            except Cis2Error as e:
                print("after sign-out: %d" % e.code)
    except Cis2Error as e:
        print("cis2_client: %s" % e, file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
