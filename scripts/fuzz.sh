#!/usr/bin/env bash
# Fuzzes the parsers that take outside input, with cargo-fuzz (libFuzzer), on nightly:
#   haid          haid::decode, and encode-then-decode
#   context_id    context_id::find (query + headers) and unwrap
#   config        Config::parse + validate
#   admin_bodies  the PUT /v1/aliases, heartbeat and POST /v1/placements bodies
# Usage: scripts/fuzz.sh SECONDS [RUNS]   each target runs SECONDS (or RUNS executions,
# whichever ends first). Seeds come from the conformance vectors and shipped configs.
# Not part of CI. A crash leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:?usage: scripts/fuzz.sh SECONDS [RUNS]}"
runs="${2:-0}"
source scripts/setup.sh
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"

corpus=fuzz/corpus
mkdir -p "$corpus"/{haid,context_id,config,admin_bodies}
# seeds: one file per conformance HAID and context-id wrapper, every shipped config, a
# few admin bodies
python3 - <<'PY'
import json, os, hashlib
def put(target, data):
    name = hashlib.sha1(data).hexdigest()
    with open(f"fuzz/corpus/{target}/{name}", "wb") as f:
        f.write(data)
for line in open("tests/data/linkis-haid-vectors.jsonl", encoding="utf-8"):
    put("haid", json.loads(line)["haid"].encode())
for line in open("tests/data/linkis-contextid-json.jsonl", encoding="utf-8"):
    v = json.loads(line)
    put("context_id", b"contextID=" + v["haid"].encode() + b"\0" + v["contextID"].encode())
    put("context_id", b"a=1\0" + v["contextID"].encode())
for name in os.listdir("config"):
    if name.endswith(".toml"):
        put("config", open(f"config/{name}", "rb").read())
for body in [
    {"instances": {"cs_1": {"address": "127.0.0.1:9101", "labels": {"zone": "a"}, "weight": 1}}},
    {"uuid": "u", "alias": "cs_1", "address": "127.0.0.1:9", "last_seen": 0},
    {"context_id": "1024", "tenant": "acme", "exclude": ["cs_3"], "path": "/x"},
]:
    put("admin_bodies", json.dumps(body).encode())
PY

targets=(haid context_id config admin_bodies)
cargo +nightly fuzz build --fuzz-dir fuzz -O
for t in "${targets[@]}"; do
  echo "== $t"
  args=(-max_total_time="$secs" -print_final_stats=1)
  [ "$runs" -gt 0 ] && args+=(-runs="$runs")
  cargo +nightly fuzz run --fuzz-dir fuzz -O "$t" "$corpus/$t" -- "${args[@]}" 2>&1 \
    | grep -E "^(Done|stat::number_of_executed_units|==|SUMMARY|.*panicked)" || true
  if ls "fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "!! $t crashed: see fuzz/artifacts/$t/"
    exit 1
  fi
done
