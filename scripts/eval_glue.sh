#!/usr/bin/env bash
# Score a fine-tuned GLUE checkpoint with the task's official metric; JSON output. See --help.
set -euo pipefail
PROG=eval_glue.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
GLUE_PY="$REPO_DIR/meo_fairseq/data/glue.py"

usage() {
  cat <<EOF2
Usage: scripts/eval_glue.sh --task NAME --data DIR --checkpoint PATH --out DIR [--subset valid]
                            [--batch-size 32] [--cpu]

Predict the --subset split of --data (prepared by scripts/prepare_glue.sh; valid = the GLUE dev
set, MNLI: valid = dev_matched, valid1 = dev_mismatched) with a checkpoint of
scripts/train_glue.sh and score it with the task's metric (scikit-learn / scipy):
accuracy; MRPC, QQP: F1 and accuracy; CoLA: Matthews correlation (and accuracy); STS-B: Pearson
and Spearman correlation. Percentages.

  --task NAME         CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE or WNLI (case-insensitive)
  --data DIR          output of scripts/prepare_glue.sh for that task
  --checkpoint PATH   e.g. SAVE_DIR/checkpoint_best.pt
  --out DIR           pred.SUBSET.txt, gold.SUBSET.txt (one label a line) and glue.json
  --subset S          valid (default), valid1 (MNLI mismatched)
  --batch-size N      sentences per batch (default 32)
  --cpu               run on the CPU even with a GPU
Output: the scores as JSON on stdout and in OUT/glue.json.
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

SUBSET=valid BATCH=32 TASK=""
declare -A EVAL_OPTS=([--batch-size]=BATCH [--task]=TASK)
parse_eval_args "$@"
[[ -n "$TASK" ]] || { usage >&2; die "--task NAME is required"; }
INFO="$("$PY" "$GLUE_PY" task-info "$TASK" 2>&1)" || die "--task: ${INFO#error: }"
read -r TASK _ _ _ <<< "$INFO"
check_int --batch-size "$BATCH" 1
CPU=()
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$a" in
    --cpu) CPU=(--cpu) ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done
check_data_dir "$DATA" input0/dict.txt "input0/$SUBSET.idx" label
check_checkpoint "$CKPT"
DATA="$(abs_path "$DATA")" CKPT="$(abs_path "$CKPT")" OUT="$(abs_path "$OUT")"

cmd=("$PY" -m meo_fairseq.scoring.glue predict --task "$TASK" --data "$DATA" --checkpoint "$CKPT"
     --out "$OUT" --subset "$SUBSET" --batch-size "$BATCH" "${CPU[@]+"${CPU[@]}"}")
print_cmd "${cmd[@]}"
"${cmd[@]}" || die "GLUE evaluation failed (see above)"
log "wrote $OUT/glue.json"
