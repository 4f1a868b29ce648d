#!/usr/bin/env bash
# Create .venv (Python 3.11) and install attrpatch with its pinned stack, once per pyproject change.
# Sourced by scripts/run.sh and scripts/test.sh; safe to run by itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone, pinned: it resolves to the CPU wheel instead of a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$stamp" > .venv/.setup-stamp
fi
