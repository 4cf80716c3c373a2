#!/usr/bin/env bash
# Create (or reuse) the virtualenv .venv in the checkout with everything meo-fairseq needs.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.meo_fairseq_setup"
want="$(cat requirements.txt setup.py scripts/setup_env.sh | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import torch, fairseq, meo_fairseq" >/dev/null 2>&1; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
$PIP install -q --upgrade pip
# torch pinned: 2.13.0 is a CPU build on this kind of machine; an unpinned torch pulls CUDA.
$PIP install -q "torch==2.13.0"
# PyPI fairseq 0.12.2 does not build on Python 3.11; ve-fairseq is upstream main + the 3.11 fix.
# --no-deps: its metadata requires torchaudio, which would pull in another torch.
$PIP install -q --no-deps "ve-fairseq==0.12.3"
$PIP install -q -r requirements.txt
$PIP install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, fairseq, meo_fairseq; print('[setup] torch', torch.__version__, '| fairseq', fairseq.__version__)"
echo "$want" > "$stamp"
