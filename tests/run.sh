#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian machine: installs the system tools the
# tests drive (curl, openssl), makes .venv with the project and its test extras, then runs
# ruff, mypy --strict and pytest. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
command -v curl >/dev/null || apt_packages+=(curl)
command -v openssl >/dev/null || apt_packages+=(openssl)
# Pebble, Let's Encrypt's test CA, for the ACME tests (tests/pebble.py)
command -v pebble >/dev/null || [ -x /usr/bin/pebble ] || apt_packages+=(pebble)
command -v python3 >/dev/null || apt_packages+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt_packages+=(python3-venv)
fi
if ((${#apt_packages[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_packages[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "tlsproxy needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
