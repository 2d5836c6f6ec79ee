#!/usr/bin/env bash
# Memory and big-table reloads (goals P6 and P7; the method is in docs/performance.md):
# RSS of a release hagate with 3 plugins and 10k aliases under load and over 20 reloads,
# and the reload time, RSS and in-flight p99 of a 100k-alias table.
#
#   benches/memory.sh
#   ALIASES=10000 BIG=100000 RELOADS=20 DURATION=10s benches/memory.sh
#   KEEP=1 benches/memory.sh        # keep the configs and the gateways' logs (removed otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
HAGATE_LOAD_TOOLS=1 source scripts/setup.sh
scripts/build-plugins.sh --quiet
if [ -z "${HAGATE_BIN:-}" ]; then
  cargo build --profile production --quiet --bin hagate
  HAGATE_BIN="${CARGO_TARGET_DIR:-target}/production/hagate"
fi
export HAGATE_BIN
exec python3 benches/memory.py
