#!/usr/bin/env bash
# The GPU check (issue 12): set-up, the device-parametrised tests on cuda, the three method benches on cuda and a
# sweep with one GPU and fractional workers; ONE summary table naming the card; about 8 minutes on an H100.
#
#     bash bench/gpu_check.sh                    # writes under $OUT when set, else results/gpu_check/<time>/
#     GPU_CHECK_DEADLINE_S=900 bash bench/gpu_check.sh   # another time box for all stages (default: 470 s
#                                                        # on a GPU, 900 s for the CPU smoke)
#
# Without a usable GPU (no nvidia-smi, or torch sees no CUDA) it says so, runs a short CPU smoke (the
# device-parametrised tests on cpu with -x, the three benches with --quick) and exits 0.
#
# Set-up, whichever applies first:
#   * GPU_CHECK_PYTHON=/path/to/python (without GPU_CHECK_OFFLINE): that interpreter as it is, the repository on
#     PYTHONPATH.
#   * a network (GPU_CHECK_OFFLINE=1 says there is none): `bash scripts/setup.sh` (.venv, pinned stack; a no-op when up to date); then, only where
#     nvidia-smi works and .venv's torch has no CUDA, the same torch==2.13.0 from PyPI, whose Linux wheel is the
#     CUDA 13.0 build (needs an NVIDIA driver >= 580; GPU_CHECK_TORCH_INDEX overrides the index). The CPU
#     set-up is untouched: scripts/setup.sh never runs this step.
#   * no network (the device tool's lent machines: python3 there is Python 3.12 with a CUDA torch, nothing can
#     be fetched): that python3 (or GPU_CHECK_PYTHON), plus the wheels of .whl/ (made here by `bash bench/gpu_wheels.sh`, carried
#     along) installed into a scratch folder. Stages whose packages are still missing are skipped and named
#     in the table (the sweep needs ray and duckdb, whose wheels alone exceed the device tool's 64 MiB carry).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
OUTDIR=${OUT:-$REPO/results/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUTDIR"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG=$OUTDIR/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_DEADLINE_S:-470}))  # set again once the device is known
STAGES=$OUTDIR/stages.tsv # stage, status, seconds, note: read by bench/gpu_summary.py
: > "$STAGES"

say() { printf '\n=== [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$STAGES"; }

# Run one stage under the time left (at most $2 seconds): `stage NAME CAP command...`
stage() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, the time box is spent"; record "$name" skipped 0 "time box spent"; return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  say "$name (at most ${cap}s): $*"
  local t=$(date +%s) rc=0
  timeout --kill-after=10 "$cap" "$@" || rc=$?
  local dt=$(($(date +%s) - t))
  if [ "$rc" = 0 ]; then record "$name" ok "$dt"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record "$name" timeout "$dt" "stopped at ${cap}s"
  else record "$name" "failed (rc $rc)" "$dt"
  fi
  return 0
}

# ------------------------------------------------------------------------------------------- 1. set-up
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  say "nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

online() { timeout 10 python3 - <<'EOF' >/dev/null 2>&1
import urllib.request
urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=8)
EOF
}

cuda_ok() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

SETUP_T=$(date +%s)
MISSING=""
if [ -n "${GPU_CHECK_PYTHON:-}" ] && [ -z "${GPU_CHECK_OFFLINE:-}" ]; then
  PY=$GPU_CHECK_PYTHON
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  SETUP_NOTE="GPU_CHECK_PYTHON=$PY"
elif [ -z "${GPU_CHECK_OFFLINE:-}" ] && online; then
  say "set-up: bash scripts/setup.sh"
  if ! bash scripts/setup.sh; then
    record setup "failed" "$(($(date +%s) - SETUP_T))" "scripts/setup.sh failed"; echo "set-up failed"; exit 1
  fi
  PY=.venv/bin/python
  SETUP_NOTE="scripts/setup.sh (.venv)"
  if [ "$GPU" = 1 ] && ! cuda_ok "$PY"; then
    INDEX=${GPU_CHECK_TORCH_INDEX:-https://pypi.org/simple}
    say "set-up: .venv's torch has no CUDA; installing torch==2.13.0 from $INDEX (the CUDA build)"
    # PIP_FIND_LINKS/PIP_CONSTRAINT emptied: a machine whose pip config points at a local CPU wheel must not
    # hand it back. Only torch (and the CUDA libraries it requires) changes.
    PIP_FIND_LINKS= PIP_CONSTRAINT= "$PY" -m pip install -q --upgrade --force-reinstall --index-url "$INDEX" \
      "torch==2.13.0" || echo "the CUDA torch install failed: the checks run on what .venv has"
    SETUP_NOTE="$SETUP_NOTE + torch==2.13.0 CUDA build from $INDEX"
  fi
else
  PY=${GPU_CHECK_PYTHON:-$(command -v python3 || true)}
  if [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    for cand in /opt/torch/.venv/bin/python3 "$PY"; do
      if [ -x "$cand" ] && cuda_ok "$cand"; then PY=$cand; break; fi
    done
  fi
  SITE=$SCRATCH/site
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
  export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
  SETUP_NOTE="offline: $PY with $REPO on PYTHONPATH"
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "set-up (offline): installing .whl/*.whl into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
      && SETUP_NOTE="$SETUP_NOTE + $(ls .whl/*.whl | wc -l) carried wheels" \
      || echo "installing the carried wheels failed"
  else
    echo "offline and no .whl/ folder: run 'bash bench/gpu_wheels.sh' where pip works and carry .whl"
  fi
fi
"$PY" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}")
for name in ("transformers", "transformer_lens", "attrpatch", "ray", "hydra", "duckdb", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:17s} {getattr(m, '__version__', '?')}  {m.__file__}")
    except Exception as e:  # noqa: BLE001 -- a report, not a check
        print(f"  {name:17s} MISSING: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
EOF
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
for mod in transformer_lens pytest; do have "$mod" || MISSING="$MISSING $mod"; done
record setup ok "$(($(date +%s) - SETUP_T))" "$SETUP_NOTE"

DEVICE=cpu
if [ "$GPU" = 1 ] && cuda_ok "$PY"; then
  DEVICE=cuda
  "$PY" -c "import torch; print('card:', torch.cuda.get_device_name(0))"
else
  if [ "$GPU" = 1 ]; then
    say "NO USABLE GPU: nvidia-smi sees a card but $PY's torch has no CUDA; running the CPU smoke only"
  else
    say "NO GPU on this machine (no working nvidia-smi): running the CPU smoke only"
  fi
fi
[ "$DEVICE" = cpu ] && DEADLINE=$((T0 + ${GPU_CHECK_DEADLINE_S:-900}))
record device "$DEVICE" 0 "$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)"

TESTS=(tests/test_engine.py tests/test_attribution.py::test_atp_matches_transformer_lens
       tests/test_edges.py::test_eap_matches_transformer_lens_edge_attribution tests/test_activation.py)
if [ -n "$MISSING" ]; then
  say "missing packages:$MISSING -- tests and benches cannot run"
  record tests skipped 0 "missing:$MISSING"
  for b in attribution edges activation; do record "bench_$b" skipped 0 "missing:$MISSING"; done
elif [ "$DEVICE" = cuda ]; then
  # ------------------------------------------------------------------------- 2. tests, 3. benches on cuda
  stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda "${TESTS[@]}"
  stage bench_attribution 90 "$PY" bench/bench_attribution.py --device cuda --quick --json "$OUTDIR/attribution.json"
  stage bench_edges 120 "$PY" bench/bench_edges.py --device cuda --quick --json "$OUTDIR/edges.json"
  stage bench_activation 120 "$PY" bench/bench_activation.py --device cuda --quick --json "$OUTDIR/activation.json"
else
  # ------------------------------------------------------------------------- the CPU smoke
  stage tests 400 "$PY" -m pytest -q -x -p no:cacheprovider -k "cpu and not full_grids" "${TESTS[@]}"
  stage bench_attribution 150 "$PY" bench/bench_attribution.py --quick --json "$OUTDIR/attribution.json"
  stage bench_edges 250 "$PY" bench/bench_edges.py --quick --json "$OUTDIR/edges.json"
  stage bench_activation 200 "$PY" bench/bench_activation.py --quick --grids resid_pre,attn_head_out_all_pos \
    --json "$OUTDIR/activation.json"
fi

# ------------------------------------------------------------------------------------------- 4. the sweep
if [ "$DEVICE" != cuda ]; then
  record sweep skipped 0 "no GPU"
elif ! "$PY" -c "import ray, hydra, duckdb" >/dev/null 2>&1; then
  say "sweep: skipped, ray / hydra-core / duckdb not importable (offline machine without their wheels)"
  record sweep skipped 0 "ray / hydra-core / duckdb not installed"
else
  SHAPES=${GPU_CHECK_SWEEP_SHAPES:-gpt2-small,gpt2-medium}
  say "sweep: random checkpoints of $SHAPES"
  "$PY" - "$SCRATCH/models" "$SHAPES" > "$SCRATCH/dirs.txt" <<'EOF'
import os, sys
from attrpatch.testing import GPT2_SHAPES, save_random_gpt2
root, names = sys.argv[1], sys.argv[2].split(",")
print(",".join(save_random_gpt2(os.path.join(root, n), seed=0, **GPT2_SHAPES[n]) for n in names))
EOF
  DIRS=$(tail -1 "$SCRATCH/dirs.txt")
  # Small models get fractional GPUs from their spec (gpt2-small 0.07, gpt2-medium 0.21 of a GPU per worker):
  # two workers per model share the one card.
  SWEEP_ARGS=("models=[$DIRS]" "methods=[attribution,activation,edge_attribution]" "method.kinds=[head_out,resid_pre]"
              task.n_prompts=64 task.shard_size=16 model.device=auto model.workers=2 wandb=disabled
              output.progress=false "name=gpu_check" "output.root=$SCRATCH/sweep"
              "hydra.run.dir=$SCRATCH/hydra")
  stage sweep 200 "$PY" -m sweeps.run "${SWEEP_ARGS[@]}"
  cp "$SCRATCH/sweep/plots/compare.md" "$OUTDIR/compare.md" 2>/dev/null || true
fi

# ------------------------------------------------------------------------------------------- 5. the table
say "summary"
"$PY" bench/gpu_summary.py "$OUTDIR" --sweep-root "$SCRATCH/sweep" | tee "$OUTDIR/summary.md"
rm -rf "$SCRATCH"
exit 0
