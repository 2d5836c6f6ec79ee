#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test hagate: cmake (pingora's
# zlib-ng), protoc (etcd-client), etcd and etcdctl (the tests start their own etcd; the
# package does not start one), rustfmt, clippy and the wasm32-wasip2 target. Idempotent: it
# installs only what is missing. Sourced by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)       # pingora's zlib-ng build
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)   # etcd-client's build.rs
[ -x /usr/bin/etcd ] || missing+=(etcd-server)                      # the etcd tests start their own
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)        # tests compact and inspect with it
if [ "${HAGATE_LOAD_TOOLS:-0}" = 1 ]; then                  # benches/load.sh only
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
      || rustup component add "$component"
  done
  # The placement plugins (plugins/) build for this target.
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 \
    || rustup target add wasm32-wasip2
fi
