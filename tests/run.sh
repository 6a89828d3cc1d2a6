#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian machine: installs the system tools the
# tests drive (curl, openssl, pebble, knot, redis-server, wrk, nginx, chromium, podman,
# haproxy), makes .venv with the project and its test extras, then runs ruff, mypy --strict
# and pytest.
# CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
command -v curl >/dev/null || apt_packages+=(curl)
command -v openssl >/dev/null || apt_packages+=(openssl)
# Pebble, Let's Encrypt's test CA, for the ACME tests (tests/pebble.py)
command -v pebble >/dev/null || [ -x /usr/bin/pebble ] || apt_packages+=(pebble)
# Knot DNS and its knsupdate, the authoritative DNS server of the DNS-01 tests (tests/knot.py)
command -v knotd >/dev/null || [ -x /usr/sbin/knotd ] || apt_packages+=(knot)
command -v knsupdate >/dev/null || apt_packages+=(knot-dnsutils)
# Redis, the shared storage of replicas, for tests/test_redis_*.py
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || apt_packages+=(redis-server)
# wrk, nginx (a native upstream) and a C compiler for the quick benchmark (benchmarks/)
command -v wrk >/dev/null || apt_packages+=(wrk)
# h2load, the HTTP/2 load generator (tests/test_http2.py, benchmarks/)
command -v h2load >/dev/null || apt_packages+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_packages+=(nginx-light)
command -v cc >/dev/null || apt_packages+=(gcc)
# podman (with runc: crun fails in this sandbox) builds and runs the image, and serves the
# Docker API for label discovery; mmdebstrap makes its base image (tests/podman.py)
command -v podman >/dev/null || apt_packages+=(podman)
command -v runc >/dev/null || apt_packages+=(runc)
command -v mmdebstrap >/dev/null || apt_packages+=(mmdebstrap)
# HAProxy in mode tcp sends PROXY protocol headers (tests/test_proxy_protocol_e2e.py)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || apt_packages+=(haproxy)
# headless Chromium and its WebDriver for the status page test (tests/test_status_browser.py)
command -v chromium >/dev/null || apt_packages+=(chromium)
command -v chromedriver >/dev/null || apt_packages+=(chromium-driver)
command -v python3 >/dev/null || apt_packages+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt_packages+=(python3-venv)
fi
if ((${#apt_packages[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  # packages such as nginx must not start their system services here
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_packages[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "tlsproxy needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
# Every package at the version tests/constraints.txt pins (the build backend too: pip's
# isolated build environment reads PIP_CONSTRAINT), so a new release cannot break a run.
PIP_CONSTRAINT="$PWD/tests/constraints.txt" \
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
