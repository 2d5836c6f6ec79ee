#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test hagate: cmake (pingora's
# zlib-ng), protoc (etcd-client), etcd and etcdctl (the tests start their own etcd; the
# package's service is kept from starting), promtool (Debian's prometheus package; the
# deploy/ tests), systemd-analyze (the systemd package; the deploy/ tests verify the units
# with it, nothing is started), curl and openssl (the TLS tests), schemathesis from PyPI (the admin API
# tests), rustfmt, clippy and the wasm32-wasip2 target. Idempotent: it
# installs only what is missing. Sourced by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)       # pingora's zlib-ng build
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)   # etcd-client's build.rs
[ -x /usr/bin/etcd ] || missing+=(etcd-server)                      # the etcd tests start their own
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)        # tests compact and inspect with it
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)        # tests check deploy/'s rules and /metrics
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)  # tests verify deploy/systemd/'s units
command -v curl >/dev/null 2>&1 || missing+=(curl)                 # the TLS tests are its clients
command -v openssl >/dev/null 2>&1 || missing+=(openssl)           # the TLS tests make their certificates
if [ "${HAGATE_LOAD_TOOLS:-0}" = 1 ]; then                  # the benches/*.sh scripts only
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Only the tools are wanted: keep the packages' services (etcd, prometheus, which would
  # listen on 9090, the demo's admin port) from starting, now and at boot.
  policy=/usr/sbin/policy-rc.d
  had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ "$had_policy" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  [ "$had_policy" = 1 ] || $sudo rm -f "$policy"
  if [ -d /run/systemd/system ]; then
    for unit in etcd prometheus prometheus-node-exporter; do
      $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi
fi
# schemathesis (PyPI) fuzzes the admin API from docs/admin-openapi.yaml (tests/openapi.rs).
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
if ! command -v schemathesis >/dev/null 2>&1 && [ ! -x "$scripts_dir/schemathesis" ]; then
  echo "setup: installing schemathesis (pip)" >&2
  python3 -m pip install --quiet schemathesis \
    || python3 -m pip install --quiet --break-system-packages schemathesis
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
