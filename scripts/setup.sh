#!/usr/bin/env bash
# Create .venv and install kmec with its test extras on a fresh machine.
# torch is pinned to the CPU build first, so nothing later can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "kmec installed in .venv ($(.venv/bin/kmec --version))"
# The report test (tests/verify/test_render_browser.py) draws the HTML report in headless
# Chromium. Install Debian's chromium when it is missing and we can (root, apt-get); setup
# never fails because of it: the test then fails and says how to install a browser.
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium for the HTML report test: apt-get install -y chromium"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
      echo "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    else
      echo "could not install chromium (tests/verify/test_render_browser.py will fail until a browser is installed)"
    fi
  else
    echo "chromium not found and not installable here (needs root and apt-get): install it for tests/verify/test_render_browser.py"
  fi
fi
