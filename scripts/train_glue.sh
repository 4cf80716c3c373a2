#!/usr/bin/env bash
# Fine-tune an MEO / MoE RoBERTa on a GLUE task prepared by scripts/prepare_glue.sh. See --help.
set -euo pipefail
PROG=train_glue.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
DEFAULT_ARCH=meo_roberta_base
GLUE_PY="$REPO_DIR/meo_fairseq/data/glue.py"

usage() {
  cat <<EOF2
Usage: scripts/train_glue.sh --task NAME --data DIR --save-dir DIR [--arch A]
                             [--upcycle-from DENSE.pt | --init-from MEO.pt] [--epochs N] [--dry-run]
                             [fairseq-train options...]

fairseq-train --task sentence_prediction with the per-task hyperparameters of fairseq's RoBERTa GLUE
recipe (examples/roberta/README.glue.md; WNLI, which it leaves out, as RTE) and the paper's MoE
setting: token-level MEO in every FFN linear, 16 experts, top-4.

  Task   classes  lr     batch  total updates  warmup  (10 epochs; best checkpoint by accuracy,
  MNLI   3        1e-5   32     123873         7432     STS-B by loss)
  QNLI   2        1e-5   32     33112          1986
  QQP    2        1e-5   32     113272         28318
  RTE    2        2e-5   16     2036           122
  SST-2  2        1e-5   32     20935          1256
  MRPC   2        1e-5   16     2296           137
  CoLA   2        1e-5   16     5336           320
  STS-B  1        2e-5   16     3598           214      (--regression-target)
  WNLI   2        2e-5   16     400            24
Common: Adam betas (0.9, 0.98), eps 1e-6, weight decay 0.1, polynomial decay, dropout 0.1,
attention dropout 0.1, --max-positions 512, --max-tokens 4400, --init-token 0 --separator-token 2.
Validation also reports MCC (CoLA), F1 (MRPC, QQP), Pearson/Spearman (STS-B).

  --task NAME          CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE or WNLI (case-insensitive)
  --data DIR           output of scripts/prepare_glue.sh for that task
  --save-dir DIR       checkpoints (checkpoint_best.pt, checkpoint_last.pt) and train.log
  --arch A             meo_roberta_base (default), meo_roberta_large, meo_roberta_tiny, ...
  --upcycle-from CKPT  start from a dense fairseq RoBERTa checkpoint of the same size
                       (--moe-upcycle-from), e.g. roberta.base/model.pt with meo_roberta_base
                       (prepare the data with --bpe gpt2 and its dict.txt)
  --init-from CKPT     start from a meo_roberta checkpoint (e.g. masked-LM pretraining here, with
                       the same --moe-* options; --finetune-from-model: optimizer, scheduler and
                       meters reset; a rerun resumes from SAVE_DIR/checkpoint_last.pt)
  --epochs N           N epochs, the total updates computed from the training-set size in
                       DATA/splits.txt (ceil(examples / batch) x N) and warmup 6% of them, instead
                       of the table (for samples and subsets of GLUE)
  --dry-run            print the command and exit
  anything else        passed to fairseq-train after the recipe's options, so it overrides them:
                       e.g. --moe-mode moe --moe-level token (vanilla MoE), --moe-mode dense,
                       --batch-size 8 --update-freq 4, --max-update 10.

The batch size is per GPU: on G GPUs pass --batch-size B/G to keep the recipe's batch.
$DEVICES_HELP
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

# Pull this script's own options out before the common parser sees the rest.
TASK="" INIT="" EPOCHS=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --task) need_value "$1" "$#" "${2-}"; TASK="$2"; shift 2 ;;
    --task=*) TASK="${1#--task=}"; shift ;;
    --init-from) need_value "$1" "$#" "${2-}"; INIT="$2"; shift 2 ;;
    --init-from=*) INIT="${1#--init-from=}"; shift ;;
    --epochs) need_value "$1" "$#" "${2-}"; EPOCHS="$2"; shift 2 ;;
    --epochs=*) EPOCHS="${1#--epochs=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ -n "$TASK" ]] || { usage >&2; die "--task NAME is required"; }
INFO="$("$PY" "$GLUE_PY" task-info "$TASK" 2>&1)" || die "--task: ${INFO#error: }"
read -r TASK NUM_CLASSES _NUM_INPUTS _METRIC <<< "$INFO"
parse_train_args "${ARGS[@]+"${ARGS[@]}"}"
if [[ -n "$INIT" ]]; then
  [[ -z "$UPCYCLE" ]] || die "--init-from and --upcycle-from exclude each other"
  [[ -f "$INIT" ]] || die "--init-from $INIT: no such checkpoint file"
  INIT="$(abs_path "$INIT")"
fi
[[ -z "$EPOCHS" ]] || check_int --epochs "$EPOCHS" 1

# lr batch total warmup
case "$TASK" in
  MNLI) HP=(1e-05 32 123873 7432) ;;
  QNLI) HP=(1e-05 32 33112 1986) ;;
  QQP) HP=(1e-05 32 113272 28318) ;;
  RTE) HP=(2e-05 16 2036 122) ;;
  SST-2) HP=(1e-05 32 20935 1256) ;;
  MRPC) HP=(1e-05 16 2296 137) ;;
  CoLA) HP=(1e-05 16 5336 320) ;;
  STS-B) HP=(2e-05 16 3598 214) ;;
  WNLI) HP=(2e-05 16 400 24) ;;
  *) die "no recipe for task $TASK" ;;
esac
LR="${HP[0]}" BSZ="${HP[1]}" TOTAL="${HP[2]}" WARMUP="${HP[3]}" MAX_EPOCH=10

if [[ -n "$EPOCHS" ]]; then
  [[ -f "$DATA/splits.txt" ]] || die "--epochs: $DATA/splits.txt is missing (prepare the data with scripts/prepare_glue.sh)"
  n_train="$(awk '$1 == "train" {print $3}' "$DATA/splits.txt")"
  [[ -n "$n_train" ]] || die "--epochs: $DATA/splits.txt has no train line"
  bsz="$(opt_value --batch-size)"
  bsz="${bsz:-$(opt_value --max-sentences)}"
  bsz="${bsz:-$BSZ}"
  TOTAL=$(( (n_train + bsz - 1) / bsz * EPOCHS ))
  WARMUP=$(( TOTAL * 6 / 100 ))
  MAX_EPOCH="$EPOCHS"
  log "--epochs $EPOCHS: $n_train training examples, batch $bsz: $TOTAL updates, $WARMUP warmup"
fi

recipe_args() {
  RECIPE=(
    --task sentence_prediction --num-classes "$NUM_CLASSES" --max-positions 512
    --init-token 0 --separator-token 2 --required-batch-size-multiple 1
    --criterion moe_sentence_prediction
    --dropout 0.1 --attention-dropout 0.1 --weight-decay 0.1
    --optimizer adam --adam-betas "(0.9, 0.98)" --adam-eps 1e-06 --clip-norm 0.0
    --lr-scheduler polynomial_decay --lr "$LR" --total-num-update "$TOTAL" --warmup-updates "$WARMUP"
    --batch-size "$BSZ" --max-tokens 4400 --max-epoch "$MAX_EPOCH"
    --find-unused-parameters
    --moe-mode meo --moe-level token --moe-experts 16 --moe-top-k 4
    --no-epoch-checkpoints --log-format simple --log-interval 100 --log-file "$SAVE_DIR/train.log"
  )
  case "$TASK" in
    STS-B) RECIPE+=(--regression-target --best-checkpoint-metric loss --report-pearson-and-spearman) ;;
    *) RECIPE+=(--best-checkpoint-metric accuracy --maximize-best-checkpoint-metric) ;;
  esac
  case "$TASK" in
    CoLA) RECIPE+=(--report-mcc) ;;
    MRPC|QQP) RECIPE+=(--report-acc-and-f1) ;;
  esac
  [[ -z "$INIT" ]] || RECIPE+=(--finetune-from-model "$INIT")
}

check_data_dir "$DATA" input0/dict.txt input0/train.idx input0/valid.idx label
run_train
