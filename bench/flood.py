#!/usr/bin/env python3
"""Memory under abuse: N same-user clients flood `status` without ever reading an answer.

    python3 bench/flood.py target/debug/cis2-agentd [CLIENTS] [SECONDS]

Starts the agent (sandbox, on its own socket in a temporary folder), prints its resident memory
(VmRSS) before, the highest seen while the clients flood, and 5 s after they hang up; then stops it.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def flood(path, until, cut_off):
    request = b'{"jsonrpc":"2.0","id":1,"method":"status"}\n' * 64
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.settimeout(1.0)
        while time.time() < until:
            try:
                s.sendall(request)
            except socket.timeout:
                continue
    except OSError:
        cut_off.append(1)
        return
    s.close()


def main(argv):
    agentd = os.path.abspath(argv[1])
    clients = int(argv[2]) if len(argv) > 2 else 250
    seconds = float(argv[3]) if len(argv) > 3 else 20
    with tempfile.TemporaryDirectory() as work:
        socket_path = os.path.join(work, "run", "agent.sock")
        env = dict(os.environ, XDG_DATA_HOME=os.path.join(work, "data"),
                   XDG_CONFIG_HOME=os.path.join(work, "no-config"), CIS2_LOG="error")
        agent = subprocess.Popen([agentd, "--sandbox", "--socket", socket_path], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            agent.stdout.readline()  # listening on …
            time.sleep(1)
            before = rss_kib(agent.pid)
            until = time.time() + seconds
            cut_off = []
            threads = [threading.Thread(target=flood, args=(socket_path, until, cut_off)) for _ in range(clients)]
            for t in threads:
                t.start()
            peak = before
            while any(t.is_alive() for t in threads):
                peak = max(peak, rss_kib(agent.pid))
                time.sleep(0.2)
            time.sleep(5)
            after = rss_kib(agent.pid)
            print("clients %d, %.0f s: RSS before %.1f MB, peak %.1f MB, 5 s after %.1f MB; clients cut off: %d"
                  % (clients, seconds, before / 1024, peak / 1024, after / 1024, len(cut_off)))
        finally:
            agent.terminate()
            agent.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
