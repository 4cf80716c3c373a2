#!/usr/bin/env bash
# The GPU measurements and tests in one command, for a machine with one CUDA GPU and no network.
#
# Steps, most important first. Each writes OUT/<step>.txt as it runs:
#   env       the machine: GPU, python, torch, fairseq
#   layers    python -m meo_fairseq.benchmark layers --device cuda: bf16 expert FFNs at BERT-base
#             shapes (32x128 and 8x512 tokens, 768/3072, 16 experts, top-4), eager and compiled,
#             as ratios to dense in the same run; op counts, graph breaks, memory
#   tests     pytest tests/test_gpu.py
#   model     python -m meo_fairseq.benchmark model --precision bf16: fairseq-train words/s of
#             dense and MEO on the XSum recipe's model (meo_bart_large, 8 experts, top-2)
#   compiled  the model step again with --moe-compile
# OUT/summary.txt says what each step ran, its exit status and its time.
# Each step has a time limit, and the whole run stays within --budget seconds. A step that would
# start with less than a minute left is skipped, so the finished steps' logs come back even when
# one step hangs.
#
# torch is the machine's own. fairseq and the packages the machine's image lacks are installed
# from .whl/ into a temporary folder; make .whl/ with scripts/gpu_wheels.sh where PyPI is reachable.
#
# Usage: bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--steps LIST] [--arch ARCH] [--dry-run]
#   --out      where the logs go (default: $OUT if set, else runs/gpu)
#   --steps    the steps to run, comma separated (default: layers,tests,model,compiled)
#   --arch     the model of the model steps (default: meo_bart_large; meo_bart_base is smaller)
#   --budget   seconds for all the steps (default 540)
#   --dry-run  the same steps at toy sizes on the CPU: checks this script on a machine without a GPU
# Environment: PYTHON (default: .venv/bin/python with --dry-run, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
budget=540
steps=layers,tests,model,compiled
arch=meo_bart_large
dry=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    --steps) steps=${2:?--steps needs a list}; shift 2 ;;
    --arch) arch=${2:?--arch needs an architecture}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case $budget in '' | *[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, not '$budget'" >&2; exit 2 ;; esac
for s in ${steps//,/ }; do
  case $s in layers | tests | model | compiled) ;; *)
    echo "gpu_check.sh: --steps: unknown step '$s' (layers, tests, model, compiled)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$out"
out=$(cd "$out" && pwd)
: > "$out/summary.txt"
export PYTHONUNBUFFERED=1
t_end=$(($(date +%s) + budget))
work=$(mktemp -d "${TMPDIR:-/tmp}/meo_gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

say() { echo "[gpu_check] $*" | tee -a "$out/summary.txt"; }

# fairseq and what else the image lacks, from the wheels (the GPU machine reaches no index)
if ! "$PY" -c "import fairseq" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl into $work/site"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
      .whl/*.whl >"$out/env.txt" 2>&1; then
      say "error: pip could not install .whl/*.whl (see env.txt)"
      exit 1
    fi
    export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "fairseq is not installed and .whl/ holds no wheels: run scripts/gpu_wheels.sh first"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # meo_fairseq from this checkout

step() {  # step NAME LIMIT COMMAND...: run COMMAND into OUT/NAME.txt within LIMIT and the budget
  local name=$1 limit=$2 left t0 rc
  shift 2
  case ",$steps," in *",$name,"*) ;; *) return ;; esac
  left=$((t_end - $(date +%s)))
  if [ "$left" -lt 60 ]; then
    say "$name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (at most ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$out/$name.txt" 2>&1
  rc=$?
  say "$name: exit $rc after $(($(date +%s) - t0))s$([ "$rc" = 124 ] && echo ', stopped at its limit')"
  tail -n 40 "$out/$name.txt"
}

{
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  "$PY" -c "import fairseq, meo_fairseq; print('fairseq', fairseq.__version__, '| meo_fairseq',
meo_fairseq.__version__, 'from', meo_fairseq.__file__)"
} >>"$out/env.txt" 2>&1
cat "$out/env.txt"
if [ "$dry" = 0 ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  say "error: torch sees no CUDA GPU (for a check of this script without one: --dry-run)"
  exit 1
fi
if ! "$PY" -c "import fairseq" 2>/dev/null; then
  say "warning: fairseq cannot be imported: only the layers step can run"
fi

bench=("$PY" -m meo_fairseq.benchmark)
model=(--task xsum --modes meo --no-generate --repeats 1 --workdir "$work/model")
if [ "$dry" = 1 ]; then
  layers=(--device cpu --dim 64 --ffn 256 --experts 4 --top-k 2 --batch 2 --tokens 32 --repeats 1)
  layers+=(--no-memory --no-compile)
  model+=(--arch meo_transformer_tiny --precision fp32 --updates 4 --log-interval 2 --max-tokens 512)
else
  layers=(--device cuda --repeats 10)
  model+=(--arch "$arch" --precision bf16 --updates 30 --log-interval 10 --max-tokens 4096)
fi
step layers 200 "${bench[@]}" layers --variants dense,moe-token,meo,meo-token "${layers[@]}"
step tests 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step model 170 "${bench[@]}" model "${model[@]}"
step compiled 240 "${bench[@]}" model "${model[@]}" --train-args=--moe-compile
say "done; logs in $out"
