#!/usr/bin/env bash
# The demo command: installs what is missing, builds, and runs `hagate demo`: the gateway
# on the embedded demo config with three demo context servers, printing curl lines to try.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec cargo run --release -- demo "$@"
