#!/usr/bin/env bash
# The demo command: installs what is missing, builds the example placement plugins and the
# gateway, and runs `hagate demo`: the gateway on the embedded demo config with three demo
# context servers and the plugins, printing curl lines to try.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
scripts/build-plugins.sh
exec cargo run --release -- demo "$@"
