#!/usr/bin/env bash
# The main job, set-up included:  bash scripts/run.sh [hydra overrides]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m sweeps.run "$@"
