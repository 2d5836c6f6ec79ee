#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test (unit, conformance,
# integration with real processes on 127.0.0.1, and each criterion bench once as a test).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec cargo test --all-targets "$@"
