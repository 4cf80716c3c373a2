#!/usr/bin/env bash
# Fetch the Python wheels that scripts/gpu_check.sh installs on a GPU machine with no network.
#
# Run this where PyPI is reachable; it writes them into DIR (default .whl, git-ignored). The GPU
# machine's image is expected to hold torch, numpy, sentencepiece, sacrebleu, scikit-learn, scipy,
# PyYAML, pytest and the like. What it lacks is fairseq and a few of fairseq's needs. These are
# pinned to the versions the CPU environment (scripts/setup_env.sh) runs.
#
# Usage: bash scripts/gpu_wheels.sh [DIR]
# Environment: GPU_PYTHON (default 3.12), the GPU machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${GPU_PYTHON:-3.12}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
# compiled: wheels for the GPU machine's Python (fairseq's Cython and C++ parts)
BINARY=(ve-fairseq==0.12.3 bitarray==3.12.3 cffi==2.1.1)
# pure Python; antlr4-python3-runtime and rouge_score exist only as sources: built into wheels here
PURE=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3
  pycparser==3.12
  nltk==3.10.4
  rouge_score==0.1.2
  tensorboardX==2.6.5
)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DIR" "${PURE[@]}"
n=$(ls "$DIR"/*.whl | wc -l)
if [ "$n" -ne $(( ${#BINARY[@]} + ${#PURE[@]} )) ]; then
  echo "error: expected $(( ${#BINARY[@]} + ${#PURE[@]} )) wheels in $DIR, found $n" >&2
  exit 1
fi
echo "[gpu_wheels] $n wheels, $(du -sh "$DIR" | cut -f1), in $DIR:"
ls "$DIR"
