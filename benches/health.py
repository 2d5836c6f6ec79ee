#!/usr/bin/env python3
"""Active health checks at ALIASES aliases (10k), each on an address of its own (127.a.b.c,
all served by one nginx): the seconds from the gateway's start until every address has
passed one check (read from `hagate_health_checks_total` on /metrics), the gateway's RSS
then and 10 s later, and its CPU time over those 10 s. Run through benches/health.sh;
HAGATE_BIN is the gateway.
"""

import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request

BIN = os.environ["HAGATE_BIN"]
ALIASES = int(os.environ.get("ALIASES", "10000"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) // 1024


def cpu_s(pid):
    """utime + stime of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    work = tempfile.mkdtemp(prefix="hagate-health.")
    up = free_port()
    with open(f"{work}/up.conf", "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/up.pid; error_log {work}/up.err;
worker_rlimit_nofile {4 * ALIASES + 1024};
events {{ worker_connections {2 * ALIASES + 1024}; }}
http {{ access_log off; server {{ listen {up}; location / {{ return 200 "ok"; }} }} }}
""")
    nginx = subprocess.Popen(["nginx", "-c", f"{work}/up.conf"])
    port, admin = free_port(), free_port()
    lines = [f"""[server]
listen = "127.0.0.1:{port}"
threads = 1
[admin]
listen = "127.0.0.1:{admin}"
[health.active]
enabled = true
path = "/"
interval = "2s"
timeout = "1s"
"""]
    for i in range(ALIASES):
        ip = f"127.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
        lines.append(f'[instances.cs_{i}_m]\naddress = "{ip}:{up}"\n')
    with open(f"{work}/hagate.toml", "w") as f:
        f.write("\n".join(lines))
    start = time.monotonic()
    with open(f"{work}/hagate.log", "w") as log:
        gw = subprocess.Popen([BIN, "run", "--config", f"{work}/hagate.toml"], stderr=log)
    try:
        checked, took = 0, None
        while time.monotonic() - start < 300:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
                    text = r.read().decode()
                checked = len(set(re.findall(
                    r'^hagate_health_checks_total\{alias="([^"]+)",result="pass"\}', text, re.M)))
            except OSError:
                pass  # not listening yet
            if checked >= ALIASES:
                took = time.monotonic() - start
                break
            time.sleep(0.5)
        then, cpu = rss_mib(gw.pid), cpu_s(gw.pid)
        time.sleep(10)
        busy = (cpu_s(gw.pid) - cpu) / 10
        print(f"{os.path.basename(BIN)}: {ALIASES} aliases, {checked} passed a check "
              f"after {'more than 300' if took is None else f'{took:.1f}'} s; "
              f"RSS {then} MiB then, {rss_mib(gw.pid)} MiB 10 s later; "
              f"CPU over those 10 s {busy:.0%} of a core")
    finally:
        gw.terminate()
        gw.wait()
        nginx.terminate()  # SIGTERM: nginx's master stops its workers too
        nginx.wait()


if __name__ == "__main__":
    main()
