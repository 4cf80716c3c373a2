#!/usr/bin/env bash
# Set up the environment (idempotent) and run the demo: dense vs MoE vs MEO language models
# trained on the bundled Wikipedia sample, from scratch and upcycled from the dense model; two
# tables and two plots in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONWARNINGS=ignore  # the demo shows its own lines and fairseq's progress, not library warnings
exec .venv/bin/python scripts/demo.py "$@"
