#!/usr/bin/env bash
# The test command: installs what is missing, builds the placement plugins, then runs every
# test: the plugins' own unit tests, and the gateway's unit, conformance and integration
# tests (real processes on 127.0.0.1, real .wasm plugins), with each criterion bench run
# once as a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
scripts/build-plugins.sh
cargo test --manifest-path plugins/Cargo.toml --target-dir plugins/target -p placement-kit
exec cargo test --all-targets "$@"
