#!/usr/bin/env bash
# Builds the placement plugins in plugins/ (their own workspace) as WebAssembly components:
#   plugins/target/wasm32-wasip2/release/{lowest_load,tenant_affinity,misbehave}.wasm
# setup.sh adds the wasm32-wasip2 target first if this toolchain lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Always plugins/target, whatever CARGO_TARGET_DIR says: the demo and the tests look there.
cargo build --release --target wasm32-wasip2 \
  --manifest-path plugins/Cargo.toml --target-dir plugins/target "$@"
