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
