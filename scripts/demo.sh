#!/usr/bin/env bash
# Set up the environment (idempotent) and run the demo: dense vs MoE vs MEO language models
# trained on the bundled Wikipedia sample, one table and two plots in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
