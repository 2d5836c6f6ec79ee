#!/usr/bin/env bash
# Active health checks at 10k aliases (docs/performance.md): seconds until every address
# has been checked once, and RSS.
#
#   benches/health.sh
#   ALIASES=10000 HAGATE_BIN=target/release/hagate benches/health.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HAGATE_LOAD_TOOLS=1 source scripts/setup.sh
if [ -z "${HAGATE_BIN:-}" ]; then
  cargo build --profile production --quiet --bin hagate
  HAGATE_BIN="${CARGO_TARGET_DIR:-target}/production/hagate"
fi
export HAGATE_BIN
exec python3 benches/health.py
