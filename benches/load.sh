#!/usr/bin/env bash
# Load comparison, all in one run on loopback (the method is in docs/performance.md):
# wrk against the upstream directly, then against nginx, HAProxy and hagate, each a plain
# reverse proxy with one worker in front of that same upstream, in interleaved rounds.
# Reports req/s, p99 and CPU microseconds per request (best and median), and hagate's
# ratios to nginx and HAProxy; with oha installed, also p99 at a constant rate.
#
#   benches/load.sh                          # 3 rounds of 10 s per target
#   ROUNDS=5 DURATION=20s benches/load.sh
#   HAGATE_BINS="before=/tmp/hagate.old after=target/release/hagate" benches/load.sh
#   PIN=1 RATE_ROUNDS=3 benches/load.sh      # proxies on a core of their own (P2)
#   PIN=1 RATE=5000 RATE_ROUNDS=3 benches/load.sh   # ... at 5k req/s, not half the peak
#   ACCESS_LOG=1 benches/load.sh             # every proxy writes an access log (nginx,
#                                            # hagate; HAProxy logs only to syslog)
#
# HAGATE_BINS compares several hagate builds side by side in the same rounds (name=path);
# by default the release build of this tree is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
HAGATE_LOAD_TOOLS=1 source scripts/setup.sh
if [ -z "${HAGATE_BINS:-}" ]; then
  cargo build --profile production --quiet --bin hagate
  HAGATE_BINS="hagate=${CARGO_TARGET_DIR:-target}/production/hagate"
fi
export HAGATE_BINS
exec python3 benches/load.py
