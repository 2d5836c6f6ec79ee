#!/usr/bin/env bash
# What a holder's heartbeats cost the gateway with a big table (docs/performance.md,
# "Heartbeats at 100k aliases"): the gateway's CPU time over 10 s without an agent, then
# with one agent holding an alias and heartbeating every 200 ms. The table is a JSON
# `table.file` of ALIASES aliases; membership is on, on the embedded store.
#
#   benches/heartbeats.sh
#   ALIASES=100000 HAGATE_BIN=target/release/hagate benches/heartbeats.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ -z "${HAGATE_BIN:-}" ]; then
  cargo build --profile production --quiet --bin hagate
  HAGATE_BIN="${CARGO_TARGET_DIR:-target}/production/hagate"
fi
ALIASES=${ALIASES:-100000}
work=$(mktemp -d -t hagate-heartbeats.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
read -r up proxy admin < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
python3 - "$work" "$ALIASES" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
inst = {f"cs_{i}": {"address": f"127.0.0.1:{20000 + i % 1000}"} for i in range(n)}
json.dump({"instances": inst}, open(f"{work}/table.json", "w"))
PY
mkdir "$work/conf" "$work/logs"
mv "$work/table.json" "$work/conf/"
cat > "$work/conf/hagate.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
threads = 1
[admin]
listen = "127.0.0.1:$admin"
[membership]
enabled = true
interval = "200ms"
timeout = "700ms"
token = "bench"
[table]
file = "table.json"
TOML
python3 -m http.server "$up" --bind 127.0.0.1 >/dev/null 2>&1 & pids+=($!)
RUST_LOG=warn "$HAGATE_BIN" run --config "$work/conf/hagate.toml" 2>"$work/logs/gateway.log" & gw=$!
pids+=($gw)
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break
  kill -0 "$gw" || { cat "$work/logs/gateway.log"; exit 1; }
  sleep 0.1
done
ticks() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
hz=$(getconf CLK_TCK)
measure() {
  local a b
  a=$(ticks); sleep 10; b=$(ticks)
  echo "$1: $(( (b - a) * 1000 / hz )) ms of CPU in 10 s"
}
sleep 2
measure "$ALIASES aliases, no agent"
"$HAGATE_BIN" agent --alias cs_1 --address "127.0.0.1:$up" --gateway "http://127.0.0.1:$admin" \
  --token bench --health-url "http://127.0.0.1:$up/" -I 200ms -T 700ms 2>"$work/logs/agent.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -H "Authorization: Bearer bench" "http://127.0.0.1:$admin/v1/membership/primary/cs_1" | grep -q '"uuid"' && break
  sleep 0.1
done
measure "$ALIASES aliases, one agent heartbeating every 200 ms"
