#!/usr/bin/env python3
"""Memory and reloads of big tables (goals P6 and P7); run through benches/memory.sh.

P7: a release hagate with 3 placement plugins and ALIASES aliases (10k) serves HAID-routed
and placed requests from wrk, then the config is reloaded RELOADS times (20); its RSS is
read from /proc/PID/status after the load warms it, and after every reload. Then a second
gateway does the same with wrk running through the reloads, RSS read SETTLE s (2) after
each: what a gateway in service holds.

P6: the same with BIG aliases (100k): how long a reload takes (the gateway logs `took_ms`
for each reload, split into `read_ms`: read, parse, validate; `plugins_ms`; and `swap_ms`:
build the table and swap), RSS before and after, and wrk's p99 for requests served while
reloads run back to back, against a run without reloads and runs beside a busy loop at
nice 0 and +10 (what any other work costs the p99 on these cores), in the same process
(SIGHUP=0 skips the reloads), and IDLE_RELOADS times (8) by SIGHUP with the config
unchanged (digested, not parsed). Then the same table as JSON through `PUT /v1/aliases`,
back to back under wrk (the gateway logs `took_ms` and `read_ms` for each), and once
inside a wrk run. Last, the
same table from a JSON file (`table.file`), reloaded back to back under wrk, and then
IDLE_RELOADS times (8) on the idle gateway, and IDLE_RELOADS times by SIGHUP with the files
unchanged (the table file is digested, not parsed, and the table kept).

P6 at a constant rate (with oha on the PATH; RATE_P6=0 skips it): wrk saturates the cores,
so its p99 mostly measures how much CPU is left. `oha -q RATE_P6` (5000 req/s) leaves
headroom. Its p99 is read through the gateway and straight from the upstream, each without
table changes and during back-to-back `table.file` reloads, interleaved, RATE_ROUNDS (2)
times: the direct figure says what the reloads cost requests that never pass through hagate.

Each alias has an address of its own (127.a.b.c, all loopback, all served by the one
upstream), as in a real deployment; SHARED=1 gives every alias the same address instead.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.environ["HAGATE_BIN"]
PLUGINS = os.environ.get("PLUGINS_DIR", "plugins/target/wasm32-wasip2/release")
ALIASES = int(os.environ.get("ALIASES", "10000"))
BIG = int(os.environ.get("BIG", "100000"))
RELOADS = int(os.environ.get("RELOADS", "20"))
DURATION = os.environ.get("DURATION", "10s")
SHARED = os.environ.get("SHARED", "0") == "1"
SETTLE = float(os.environ.get("SETTLE", "2"))
SIGHUP = os.environ.get("SIGHUP", "1") == "1"
IDLE_RELOADS = int(os.environ.get("IDLE_RELOADS", "8"))
RATE_P6 = int(os.environ.get("RATE_P6", "5000"))
RATE_ROUNDS = int(os.environ.get("RATE_ROUNDS", "2"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def poll(what, check, deadline=300.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            v = check()
            if v:
                return v
        except OSError:
            pass
        time.sleep(0.02)
    sys.exit(f"memory: {what} did not happen within {deadline} s")


def upstream():
    """One nginx answering 200 on every path and every address, for every alias."""
    port = free_port()
    work = tempfile.mkdtemp(prefix="hagate-mem-up.")
    with open(f"{work}/up.conf", "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/up.pid; error_log {work}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen {port}; location / {{ return 200 "ok"; }} }} }}
""")
    return port, subprocess.Popen(["nginx", "-c", f"{work}/up.conf"]), work


def write_config(path, port, admin, up, n, generation, json_table=False):
    plugins = ""
    for i, name in enumerate(("lowest_load", "tenant_affinity", "lowest_load")):
        wasm = f"{os.path.abspath(PLUGINS)}/{name}.wasm"
        with open(wasm, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        plugins += f"""
[[plugins]]
name = "p{i}-{name}"
path = "{wasm}"
sha256 = "{sha}"
deadline = "50ms"
"""
    lines = [f"""[server]
listen = "127.0.0.1:{port}"
threads = 1
[admin]
listen = "127.0.0.1:{admin}"
max_body = "64MiB"
[log]
format = "json"
[health.active]
enabled = false
# generation {generation}
{plugins}"""]
    if json_table:
        # the table in a JSON file of its own (`table.file`), rewritten by every reload
        with open(path + ".json.tmp", "wb") as f:
            f.write(table_json(up, n, generation))
        os.replace(path + ".json.tmp", path + ".json")
        lines.append(f'[table]\nfile = "{path}.json"\n')
    else:
        lines.append(table_toml(up, n, generation))
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)


# The tables as written, made once: writing a reload's table costs the driver a copy, not
# the half second of Python it takes to build 100k aliases and dump them, which would run
# beside the gateway on the same 2 cores and raise the p99 measured during reloads.
WRITTEN = {}


def table_json(up, n, generation):
    """`instances` as the JSON of a `table.file`; the zones repeat every 2 generations."""
    key = ("json", up, n, generation % 2)
    if key not in WRITTEN:
        WRITTEN[key] = json.dumps({"instances": instances(up, n, generation)}).encode()
    return WRITTEN[key]


def table_toml(up, n, generation):
    """`instances` as the config's `[instances.*]` tables. Generations alternate the zones,
    so that every reload changes the table and builds it (a reload that finds the table
    as it was keeps it)."""
    key = ("toml", up, n, generation % 2)
    if key not in WRITTEN:
        WRITTEN[key] = "\n".join(
            f'[instances.{alias}]\naddress = "{spec["address"]}"\n'
            f'labels = {{ zone = "{spec["labels"]["zone"]}" }}\n'
            for alias, spec in instances(up, n, generation % 2).items())
    return WRITTEN[key]


def instances(up, n, generation):
    """The table: `n` aliases, each on its own address; `generation` moves the zones."""
    table = {}
    for i in range(n):
        ip = "127.0.0.1" if SHARED else f"127.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
        table[f"cs_{i}_m"] = {"address": f"{ip}:{up}",
                              "labels": {"zone": "ab"[(i + generation) % 2]}}
    return table


def put_table(admin, body):
    """PUT /v1/aliases; the seconds from the first byte sent to the answer read."""
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/v1/aliases", data=body,
                                 method="PUT", headers={"content-type": "application/json"})
    start = time.monotonic()
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    took = time.monotonic() - start
    if answer.get("size") is None:
        sys.exit(f"memory: PUT /v1/aliases answered {answer}")
    return took


def put_times(log_path):
    """The `alias table put` events of the log, in order."""
    return [e for e in events(log_path) if e.get("message") == "alias table put"]


def wrk(port, headers, duration):
    args = ["wrk", "-t1", "-c16", f"-d{duration}", "--latency"]
    for h in headers:
        args += ["-H", h]
    args.append(f"http://127.0.0.1:{port}/api/rest_j/v1/contextservice/get")
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def oha(port, headers, duration):
    """oha at RATE_P6 req/s for `duration`, started; `oha_p99_us` reads its answer."""
    args = ["oha", "--no-tui", "--output-format", "json", "--latency-correction", "-z",
            duration, "-q", str(RATE_P6), "-c", "16"]
    for h in headers:
        args += ["-H", h]
    args.append(f"http://127.0.0.1:{port}/api/rest_j/v1/contextservice/get")
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def oha_p99_us(out):
    out = json.loads(out)
    codes = set(out.get("statusCodeDistribution", {})) - {"200"}
    if codes:
        sys.exit(f"memory: oha saw answers {sorted(codes)} at a constant rate")
    return out["latencyPercentiles"]["p99"] * 1e6


def us(value, unit):
    return float(value) * {"us": 1.0, "ms": 1000.0, "s": 1e6}[unit]


def p99_us(out):
    return us(*re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups())


def max_us(out):
    """The slowest request: the Max column of wrk's Latency line."""
    return us(*re.search(r"^\s+Latency(?:\s+\S+){2}\s+([\d.]+)(us|ms|s)", out, re.M).groups())


def events(log_path):
    """The JSON events of the log, in order."""
    out = []
    with open(log_path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            out.append(event.get("fields", event))
    return out


def reload_times(log_path):
    """The `config reloaded` events of the log, in order."""
    return [e for e in events(log_path) if e.get("message") == "config reloaded"]


def gateway(n, up, work, name, json_table=False):
    port, admin = free_port(), free_port()
    conf = f"{work}/{name}.toml"
    write_config(conf, port, admin, up, n, 0, json_table)
    log = f"{work}/{name}.log"
    proc = subprocess.Popen([BIN, "run", "--config", conf], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))
    def up():
        if proc.poll() is not None:
            sys.exit(f"memory: the gateway exited; its log is {log}")
        return get(f"http://127.0.0.1:{admin}/healthz") is not None
    poll("the gateway start", up)
    return proc, port, admin, conf, log


def reload(proc, conf, port, admin, up, n, generation, log, json_table=False):
    before = len(reload_times(log))
    write_config(conf, port, admin, up, n, generation, json_table)
    proc.send_signal(signal.SIGHUP)
    return poll(f"reload {generation}", lambda: len(reload_times(log)) > before and
                reload_times(log)[-1])


def unchanged_sighups(proc, log, what):
    """SIGHUP IDLE_RELOADS times with the files as they were, each once the one before has
    been logged: the files are digested, not parsed, and the table kept, not rebuilt."""
    same = []
    for _ in range(IDLE_RELOADS):
        before = len(reload_times(log))
        proc.send_signal(signal.SIGHUP)
        same.append(poll("a reload of unchanged files",
                         lambda: len(reload_times(log)) > before and reload_times(log)[-1]))
    print(f"P6 by SIGHUP with {what} unchanged, the gateway idle, over {len(same)} reloads: "
          f"took_ms {spread(same, 'took_ms')}; table {sorted(set(e.get('table') for e in same))}, "
          f"config_file {sorted(set(str(e.get('config_file')) for e in same))}")


def spread(events, key):
    v = sorted(e[key] for e in events if key in e)
    if not v:
        return "not logged (an older hagate)"
    return f"median {v[len(v) // 2]}, min {v[0]}, max {v[-1]}"


def main():
    haid = subprocess.run([BIN, "haid", "encode", "--main", "cs_1_m", "--backup", "cs_2_m",
                           "--id", "7"], capture_output=True, text=True, check=True).stdout.strip()
    up, up_proc, up_work = upstream()
    work = tempfile.mkdtemp(prefix="hagate-mem.")
    procs = [up_proc]
    try:
        # P7 (RELOADS=0 skips it)
        if RELOADS:
            proc, port, admin, conf, log = gateway(ALIASES, up, work, "p7")
            procs.append(proc)
            routed = wrk(port, [f"contextID: {haid}"], DURATION)
            placed = wrk(port, [], DURATION)
            routed.communicate(), placed.communicate()
            rss = [rss_kib(proc.pid)]
            took = []
            for g in range(1, RELOADS + 1):
                took.append(reload(proc, conf, port, admin, up, ALIASES, g, log))
                rss.append(rss_kib(proc.pid))
            print(f"P7: {ALIASES} aliases, 3 plugins, after wrk (HAID-routed and placed): "
                  f"RSS {rss[0] / 1024:.1f} MiB")
            print(f"    after each of {RELOADS} reloads (MiB): "
                  + " ".join(f"{r / 1024:.1f}" for r in rss[1:]))
            print(f"    reload took_ms: {spread(took, 'took_ms')}")
            proc.terminate()
            proc.wait()
            # The same with the load kept running through the reloads: the allocator hands
            # freed pages back to the system only while it is called (mimalloc purges
            # after 1 s, on a later free), so RSS right after a reload on an idle gateway
            # counts memory that a busy one returns. Sampled SETTLE s after each reload.
            proc, port, admin, conf, log = gateway(ALIASES, up, work, "p7-busy")
            procs.append(proc)
            span = f"{int(5 + RELOADS * (SETTLE + 2) + 30)}s"
            load = [wrk(port, [f"contextID: {haid}"], span), wrk(port, [], span)]
            time.sleep(5)  # pacing, not synchronising: the first sample is after 5 s of load
            busy = [rss_kib(proc.pid)]
            for g in range(1, RELOADS + 1):
                reload(proc, conf, port, admin, up, ALIASES, g, log)
                time.sleep(SETTLE)  # pacing: the allocator's purge delay, under load
                busy.append(rss_kib(proc.pid))
            for w in load:
                w.kill()
            print(f"P7 under load: RSS after 5 s of wrk {busy[0] / 1024:.1f} MiB; "
                  f"{SETTLE:g} s after each of {RELOADS} reloads (MiB): "
                  + " ".join(f"{r / 1024:.0f}" for r in busy[1:]))
            proc.terminate()
            proc.wait()

        if BIG == 0:
            return
        # P6
        proc, port, admin, conf, log = gateway(BIG, up, work, "p6")
        procs.append(proc)
        first = rss_kib(proc.pid)
        quiet = wrk(port, [f"contextID: {haid}"], DURATION).communicate()[0]
        print(f"P6: {BIG} aliases; wrk p99 without table changes {p99_us(quiet):.0f} us, "
              f"max {max_us(quiet):.0f} us")
        # the reference for the p99 during back-to-back reloads: the same run beside one
        # busy loop, any work that keeps a core busy (2 cores, and wrk, the upstream and
        # the gateway already want them)
        for nice in (0, 10):
            loop = subprocess.Popen(["nice", "-n", str(nice), "sh", "-c", "while :; do :; done"])
            try:
                hog = wrk(port, [f"contextID: {haid}"], DURATION).communicate()[0]
            finally:
                loop.kill()
                loop.wait()
            print(f"    the same beside a busy loop at nice {nice}: p99 {p99_us(hog):.0f} us, "
                  f"max {max_us(hog):.0f} us")
        if SIGHUP:
            busy = wrk(port, [f"contextID: {haid}"], DURATION)
            took, g = [], 0
            while busy.poll() is None:
                g += 1
                took.append(reload(proc, conf, port, admin, up, BIG, g, log))
            busy_out = busy.communicate()[0]
            after = rss_kib(proc.pid)
            print(f"P6 by config reload, over {len(took)} reloads: took_ms {spread(took, 'took_ms')}")
            for key in ("read_ms", "plugins_ms", "swap_ms"):
                print(f"    {key}: {spread(took, key)}")
            print(f"    RSS at start {first / 1024:.1f} MiB, after the reloads {after / 1024:.1f} MiB")
            print(f"    wrk p99 during back-to-back reloads {p99_us(busy_out):.0f} us")
            # one reload in the middle of a run: what the requests in flight around it see
            one = wrk(port, [f"contextID: {haid}"], DURATION)
            time.sleep(1)  # pacing the load, not synchronising: wrk is warm by then
            g += 1
            single = reload(proc, conf, port, admin, up, BIG, g, log)
            one_out = one.communicate()[0]
            print(f"    one reload ({single['took_ms']} ms) within a {DURATION} run: p99 "
                  f"{p99_us(one_out):.0f} us, max {max_us(one_out):.0f} us")
            unchanged_sighups(proc, log, "the config (TOML)")
        # the same table as JSON through the admin API: PUT back to back under load
        bodies = [json.dumps({"instances": instances(up, BIG, g)}).encode() for g in (1, 2)]
        busy = wrk(port, [f"contextID: {haid}"], DURATION)
        client = []
        while busy.poll() is None:
            client.append(put_table(admin, bodies[len(client) % 2]))
        busy_out = busy.communicate()[0]
        puts = put_times(log)
        print(f"P6 by PUT /v1/aliases ({len(bodies[0]) / 2**20:.1f} MiB of JSON), over "
              f"{len(puts)} PUTs: took_ms {spread(puts, 'took_ms')}")
        print(f"    read_ms (read and parse the body): {spread(puts, 'read_ms')}")
        ms = sorted(c * 1000 for c in client)
        print(f"    seen by the client (send, answer): median {ms[len(ms) // 2]:.0f}, "
              f"min {ms[0]:.0f}, max {ms[-1]:.0f}")
        print(f"    wrk p99 during back-to-back PUTs {p99_us(busy_out):.0f} us, "
              f"RSS after {rss_kib(proc.pid) / 1024:.1f} MiB")
        one = wrk(port, [f"contextID: {haid}"], DURATION)
        time.sleep(1)  # pacing the load, not synchronising: wrk is warm by then
        single = put_table(admin, bodies[len(client) % 2])
        one_out = one.communicate()[0]
        print(f"    one PUT ({put_times(log)[-1]['took_ms']} ms in the gateway, "
              f"{single * 1000:.0f} ms seen) within a {DURATION} run: p99 "
              f"{p99_us(one_out):.0f} us, max {max_us(one_out):.0f} us")
        proc.terminate()
        proc.wait()
        # the same table from a JSON file (`table.file`), reloaded back to back under wrk
        proc, port, admin, conf, log = gateway(BIG, up, work, "p6-json", json_table=True)
        procs.append(proc)
        busy = wrk(port, [f"contextID: {haid}"], DURATION)
        took, g = [], 0
        while busy.poll() is None:
            g += 1
            took.append(reload(proc, conf, port, admin, up, BIG, g, log, json_table=True))
        busy_out = busy.communicate()[0]
        print(f"P6 by reload of table.file (JSON), over {len(took)} reloads: took_ms "
              f"{spread(took, 'took_ms')}")
        for key in ("read_ms", "swap_ms"):
            print(f"    {key}: {spread(took, key)}")
        print(f"    wrk p99 during back-to-back reloads {p99_us(busy_out):.0f} us")
        # at a constant rate, through the gateway and straight from the upstream, without
        # table changes and during back-to-back reloads, interleaved
        if RATE_P6 and RATE_ROUNDS and shutil.which("oha"):
            p99 = {}
            for r in range(RATE_ROUNDS):
                for target, reloading in ((port, False), (port, True), (up, True), (up, False)):
                    busy = oha(target, [f"contextID: {haid}"], DURATION)
                    while busy.poll() is None:
                        if reloading:
                            g += 1
                            reload(proc, conf, port, admin, up, BIG, g, log, json_table=True)
                        else:
                            time.sleep(0.1)  # pacing the check, not synchronising
                    key = ("hagate" if target == port else "direct", reloading)
                    p99.setdefault(key, []).append(oha_p99_us(busy.communicate()[0]))
            print(f"P6 at a constant rate (oha -q {RATE_P6} -c 16 -z {DURATION}, {RATE_ROUNDS} "
                  f"interleaved rounds), p99 in us:")
            for name in ("hagate", "direct"):
                quiet, during = p99[(name, False)], p99[(name, True)]
                print(f"    {name:<7} without table changes {', '.join(f'{v:.0f}' for v in quiet)}; "
                      f"during back-to-back reloads {', '.join(f'{v:.0f}' for v in during)}")
        elif RATE_P6 and RATE_ROUNDS:
            print("P6 at a constant rate: oha is not on the PATH (cargo install oha --locked)")
        # and on the idle gateway: each reload starts once the one before has been logged
        took = [reload(proc, conf, port, admin, up, BIG, g + i, log, json_table=True)
                for i in range(1, IDLE_RELOADS + 1)]
        print(f"P6 by reload of table.file (JSON), the gateway idle, over {len(took)} "
              f"reloads: took_ms {spread(took, 'took_ms')}")
        for key in ("read_ms", "swap_ms"):
            print(f"    {key}: {spread(took, key)}")
        unchanged_sighups(proc, log, "the table file")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        # The configs and the gateways' logs: KEEP=1 leaves them for a look.
        if os.environ.get("KEEP", "0") == "1":
            print(f"memory: configs and logs kept in {work} and {up_work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(up_work, ignore_errors=True)


if __name__ == "__main__":
    main()
