#!/usr/bin/env python3
"""Side-by-side load comparison on loopback; run through benches/load.sh.

Targets: the upstream itself (direct), nginx, HAProxy and hagate (one or more builds), each a
reverse proxy with one worker in front of the same nginx upstream answering 1 KiB from
memory. hagate routes every request by a HAID header.

Each round runs wrk against every target in turn (the order rotates each round), and reads
the target's CPU time (utime + stime of all its processes, from /proc/PID/stat) before and
after. The headline figure is CPU microseconds per request: CPU time over the run divided by
the requests wrk saw served. It is far steadier than req/s on a shared machine. Best and
median over the rounds are reported, and the ratios are taken between figures of the same
run.

With oha on the PATH (cargo install oha --locked), a second phase measures latency at a constant rate:
half of the best hagate throughput seen, direct and through each proxy, in RATE_ROUNDS
interleaved rounds (1), and reports the median p99 and what each proxy adds to direct's
(goal P2). RATE=N sets the rate instead: a rate low enough that nothing waits for a core
shows each proxy's own latency, where the goal's rate on 2 cores shows the queueing.

PIN=1 gives the proxies cores of their own (taskset): the upstream and the load generators
(wrk, oha) run on LOAD_CPUS (0), and each proxy (nginx, HAProxy, every hagate) on
PROXY_CPUS (1), so that what a proxy adds to latency is its own work and not time spent
waiting for a core that the load generator holds. On 2 cores the load side then saturates
its one core (docs/performance.md, "Run 6"); on 4 or more, give it more
(LOAD_CPUS=0-2 PROXY_CPUS=3).
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

DURATION = os.environ.get("DURATION", "10s")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
CONNS = int(os.environ.get("CONNS", "32"))
RATE_DURATION = os.environ.get("RATE_DURATION", "10s")
# ACCESS_LOG=1: every proxy logs each request to a file, as a production proxy does: nginx
# with a 64 KiB buffer, hagate as JSON (`log.access`, stderr to the file). HAProxy logs
# only to syslog, so it stays without.
ACCESS_LOG = os.environ.get("ACCESS_LOG", "0") == "1"
RATE_ROUNDS = int(os.environ.get("RATE_ROUNDS", "1"))
# RATE=N: the constant rate, in place of half of hagate's best req/s (the goal's rate)
RATE = int(os.environ.get("RATE", "0"))
PIN = os.environ.get("PIN", "0") == "1"
# With PIN=1: the CPUs of the load generators and the upstream, and of the proxies (taskset
# lists, such as "0-1").
LOAD_CPU = os.environ.get("LOAD_CPUS", "0")
PROXY_CPU = os.environ.get("PROXY_CPUS", "1")
TICK = os.sysconf("SC_CLK_TCK")


def pinned(args, cpus):
    """`args` run on the CPUs `cpus` alone when PIN=1 (taskset), as they are otherwise."""
    return ["taskset", "-c", cpus] + args if PIN else args

BODY = "x" * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pids):
    """(utime, stime) of the processes (each with all its threads), in clock ticks."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: fields are counted after its ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def wait_ready(port, path="/health", deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"load: nothing answered on port {port} within {deadline} s")


def parse_wrk(out):
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    scale = {"us": 1.0, "ms": 1000.0, "s": 1e6}[m.group(2)]
    return reqs, rps, float(m.group(1)) * scale


class Target:
    def __init__(self, name, port, procs, headers):
        self.name, self.port, self.procs, self.headers = name, port, procs, headers
        self.rps, self.p99, self.cpu, self.sys = [], [], [], []

    def pids(self):
        pids = []
        for p in self.procs:
            pids.append(p.pid)
            pids.extend(children(p.pid))
        return pids

    def run(self):
        args = pinned(["wrk", "-t1", f"-c{CONNS}", f"-d{DURATION}", "--latency"], LOAD_CPU)
        for h in self.headers:
            args += ["-H", h]
        args.append(f"http://127.0.0.1:{self.port}/api/rest_j/v1/contextservice/get")
        pids = self.pids()
        before = cpu_ticks(pids)
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        after = cpu_ticks(pids)
        if "Non-2xx" in out or "Socket errors" in out:
            sys.exit(f"load: {self.name} answered errors:\n{out}")
        reqs, rps, p99 = parse_wrk(out)
        self.rps.append(rps)
        self.p99.append(p99)
        user, system = after[0] - before[0], after[1] - before[1]
        self.cpu.append((user + system) / TICK * 1e6 / reqs)
        self.sys.append(system / TICK * 1e6 / reqs)


def main():
    bins = os.environ.get("HAGATE_BINS", "").split()
    if not bins:
        sys.exit("load: HAGATE_BINS is empty (run benches/load.sh)")
    if PIN and (os.cpu_count() or 1) < 2:
        sys.exit("load: PIN=1 needs 2 cores or more")
    if PIN:
        for cpus in (LOAD_CPU, PROXY_CPU):
            if subprocess.run(["taskset", "-c", cpus, "true"]).returncode != 0:
                sys.exit(f"load: taskset cannot run on CPUs {cpus!r} (LOAD_CPUS, PROXY_CPUS)")
    work = tempfile.mkdtemp(prefix="hagate-load.")
    procs = []

    def start(args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, **kw)
        procs.append(p)
        return p

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        up, ngx, hap = free_port(), free_port(), free_port()
        with open(f"{work}/upstream.conf", "w") as f:
            f.write(f"""worker_processes 2; daemon off; pid {work}/up.pid; error_log {work}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{up}; location / {{ return 200 "{BODY}"; }} }} }}
""")
        ngx_log = (f"access_log {work}/ngx.access combined buffer=64k;" if ACCESS_LOG
                   else "access_log off;")
        with open(f"{work}/nginx.conf", "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {work}/ngx.pid; error_log {work}/ngx.err;
events {{ worker_connections 4096; }}
http {{ {ngx_log} keepalive_requests 1000000;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ngx};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
        with open(f"{work}/haproxy.cfg", "w") as f:
            f.write(f"""global
  nbthread 1
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:{hap}
  default_backend b
backend b
  server s1 127.0.0.1:{up}
""")
        start(pinned(["nginx", "-c", f"{work}/upstream.conf"], LOAD_CPU))
        direct = Target("direct", up, [procs[-1]], [])
        start(pinned(["nginx", "-c", f"{work}/nginx.conf"], PROXY_CPU))
        targets = [direct, Target("nginx", ngx, [procs[-1]], [])]
        start(pinned(["haproxy", "-f", f"{work}/haproxy.cfg", "-db"], PROXY_CPU),
              stderr=subprocess.DEVNULL)
        targets.append(Target("haproxy", hap, [procs[-1]], []))

        haid = None
        for spec in bins:
            name, _, path = spec.partition("=")
            port, admin = free_port(), free_port()
            conf = f"{work}/{name}.toml"
            with open(conf, "w") as f:
                f.write(f"""[server]
listen = "127.0.0.1:{port}"
threads = 1
[admin]
listen = "127.0.0.1:{admin}"
[instances.cs_1_bench]
address = "127.0.0.1:{up}"
[instances.cs_2_bench]
address = "127.0.0.1:{up}"
""")
                if ACCESS_LOG:
                    f.write('[log]\nformat = "json"\naccess = true\n')
            if haid is None:
                haid = subprocess.run(
                    [path, "haid", "encode", "--main", "cs_1_bench", "--backup", "cs_2_bench",
                     "--id", "1024"], capture_output=True, text=True, check=True).stdout.strip()
            # Not beside the config: the gateway watches the config's directory, and would
            # wake for every write of its own log (docs/operating.md, "Logs").
            os.makedirs(f"{work}/logs", exist_ok=True)
            err = open(f"{work}/logs/{name}.err", "w")
            start(pinned([path, "run", "--config", conf], PROXY_CPU), stderr=err,
                  env=dict(os.environ,
                           RUST_LOG="warn,hagate::access=info" if ACCESS_LOG else "warn"))
            targets.append(Target(name, port, [procs[-1]], [f"contextID: {haid}"]))

        for t in targets:
            wait_ready(t.port)
        # One short warm-up each: pools filled, pages touched.
        global DURATION
        measured, DURATION = DURATION, "2s"
        for t in targets:
            t.run()
            t.rps.clear(), t.p99.clear(), t.cpu.clear(), t.sys.clear()
        DURATION = measured

        for r in range(ROUNDS):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                t.run()
                print(f"round {r + 1}/{ROUNDS} {t.name:<10} {t.rps[-1]:>9.0f} req/s "
                      f"p99 {t.p99[-1]:>7.0f} us  {t.cpu[-1]:>6.1f} CPU us/req", file=sys.stderr)

        report(targets, rate_phase(targets))
    finally:
        stop()


def rate_phase(targets):
    """p99 at a constant rate (half of hagate's best throughput), with oha if present;
    None without oha, or with RATE_ROUNDS=0."""
    if shutil.which("oha") is None or RATE_ROUNDS == 0:
        return None
    hagates = targets[3:]
    rate = RATE or int(min(max(t.rps) for t in hagates) / 2)
    p99 = {t.name: [] for t in targets}
    for r in range(RATE_ROUNDS):
        for t in targets[r % len(targets):] + targets[:r % len(targets)]:
            args = pinned(["oha", "--no-tui", "--output-format", "json", "--latency-correction",
                           "-z", RATE_DURATION, "-q", str(rate), "-c", str(CONNS)], LOAD_CPU)
            for h in t.headers:
                args += ["-H", h]
            args.append(f"http://127.0.0.1:{t.port}/api/rest_j/v1/contextservice/get")
            out = json.loads(subprocess.run(args, capture_output=True, text=True,
                                            check=True).stdout)
            codes = out.get("statusCodeDistribution", {})
            if set(codes) - {"200"}:
                sys.exit(f"load: {t.name} answered {codes} at a constant rate")
            p99[t.name].append(out["latencyPercentiles"]["p99"] * 1e6)
            print(f"rate round {r + 1}/{RATE_ROUNDS} {t.name:<10} p99 {p99[t.name][-1]:>7.0f} us",
                  file=sys.stderr)
    return rate, p99


def report(targets, rated):
    def med(xs):
        return statistics.median(xs)

    print(f"\nwrk -t1 -c{CONNS} -d{DURATION}, {ROUNDS} interleaved rounds, 1 KiB answers, "
          f"one worker each, loopback, {os.cpu_count()} cores"
          + (f"; PIN=1: upstream and load on CPU {LOAD_CPU}, proxies on CPU {PROXY_CPU}"
             if PIN else ""))
    print(f"{'target':<10} {'req/s best':>11} {'median':>9} {'p99 us best':>12} {'median':>8}"
          f" {'CPU us/req best':>16} {'median':>8} {'of it kernel':>13}")
    for t in targets:
        print(f"{t.name:<10} {max(t.rps):>11.0f} {med(t.rps):>9.0f} {min(t.p99):>12.0f} "
              f"{med(t.p99):>8.0f} {min(t.cpu):>16.1f} {med(t.cpu):>8.1f} {med(t.sys):>13.1f}")
    by = {t.name: t for t in targets}
    print("\nratios (hagate over the peer; CPU below 1.00 and throughput above 1.00 are better)")
    print(f"{'':<22} {'CPU/req best':>13} {'median':>8} {'req/s best':>11} {'median':>8}")
    for h in targets[3:]:
        for peer in ("nginx", "haproxy"):
            p = by[peer]
            print(f"{h.name + ' / ' + peer:<22} {min(h.cpu) / min(p.cpu):>13.2f} "
                  f"{med(h.cpu) / med(p.cpu):>8.2f} {max(h.rps) / max(p.rps):>11.2f} "
                  f"{med(h.rps) / med(p.rps):>8.2f}")
    if rated is not None:
        rate, p99 = rated
        why = "RATE" if RATE else "half of hagate's best req/s"
        print(f"\noha -q {rate} -c {CONNS} -z {RATE_DURATION} ({why}), "
              f"{RATE_ROUNDS} interleaved rounds: p99, and p99 added over direct's in the same "
              "round (median; all rounds)")
        for name, vs in p99.items():
            line = f"{name:<10} p99 {med(vs):>7.0f} us"
            if name != "direct":
                added = [v - d for v, d in zip(vs, p99["direct"])]
                line += (f"  added {med(added):>+6.0f} us  ("
                         + " ".join(f"{a:+.0f}" for a in added) + ")")
            print(line)
    elif RATE_ROUNDS == 0:
        print("\n(RATE_ROUNDS=0: no constant-rate p99)")
    else:
        print("\n(oha not on the PATH: no constant-rate p99; cargo install oha --locked)")


if __name__ == "__main__":
    main()
