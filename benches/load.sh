#!/usr/bin/env bash
# Load comparison, all in one run on loopback: wrk against the upstream directly, then
# against nginx, HAProxy and hagate, each a plain reverse proxy to that same upstream with
# one worker. Prints req/s and p99, and the ratios that matter. Numbers swing +-20% between
# runs on a shared machine, so compare within one run only.
#
#   benches/load.sh            # 10 s per target
#   DURATION=30s benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HAGATE_LOAD_TOOLS=1 source scripts/setup.sh
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-32}"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/hagate"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); NGX=$(port); HAP=$(port); HG=$(port); HGA=$(port)
body=$(head -c 1024 /dev/zero | tr '\0' 'x')

# The upstream: nginx answering 1 KiB from memory (also /health for hagate's checks).
cat > "$work/upstream.conf" <<CONF
worker_processes 2; daemon off; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "$body"; } } }
CONF
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/ngx.pid; error_log $work/ngx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NGX;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$HAP
  default_backend b
backend b
  server s1 127.0.0.1:$UP
CONF
cat > "$work/hagate.toml" <<CONF
[server]
listen = "127.0.0.1:$HG"
threads = 1
[admin]
listen = "127.0.0.1:$HGA"
[instances.cs_1_bench]
address = "127.0.0.1:$UP"
[instances.cs_2_bench]
address = "127.0.0.1:$UP"
CONF

nginx -c "$work/upstream.conf" & pids+=($!)
nginx -c "$work/nginx.conf" & pids+=($!)
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
RUST_LOG=warn "$BIN" run --config "$work/hagate.toml" 2>"$work/hagate.err" & pids+=($!)

for p in $UP $NGX $HAP $HG; do
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$p/health" && break
    python3 -c 'import time; time.sleep(0.1)'
  done
done

HAID=$("$BIN" haid encode --main cs_1_bench --backup cs_2_bench --id 1024)
declare -A rps p99
run() { # name port
  local out
  out=$(wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "contextID: $HAID" "http://127.0.0.1:$2/api/rest_j/v1/contextservice/get")
  if echo "$out" | grep -q "Non-2xx"; then echo "$1: non-2xx answers:"; echo "$out"; exit 1; fi
  rps[$1]=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99[$1]=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}')
}
run direct "$UP"; run nginx "$NGX"; run haproxy "$HAP"; run hagate "$HG"

echo
echo "wrk -t1 -c$CONNS -d$DURATION, 1 KiB body, one worker each, loopback ($(nproc) cores)"
printf '%-8s %12s %10s\n' target req/s p99_ms
for t in direct nginx haproxy hagate; do printf '%-8s %12s %10s\n' "$t" "${rps[$t]}" "${p99[$t]}"; done
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo
echo "hagate/nginx   throughput $(ratio "${rps[hagate]}" "${rps[nginx]}")   p99 $(ratio "${p99[hagate]}" "${p99[nginx]}")"
echo "hagate/haproxy throughput $(ratio "${rps[hagate]}" "${rps[haproxy]}")   p99 $(ratio "${p99[hagate]}" "${p99[haproxy]}")"
echo "hagate/direct  throughput $(ratio "${rps[hagate]}" "${rps[direct]}")   p99 $(ratio "${p99[hagate]}" "${p99[direct]}")"
