#!/usr/bin/env bash
# Train an MEO / MoE summarization model on XSum prepared by scripts/prepare_xsum.sh. See --help.
set -euo pipefail
PROG=train_xsum.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
DEFAULT_ARCH=meo_bart_large

usage() {
  cat <<EOF
Usage: scripts/train_xsum.sh --data DIR --save-dir DIR [--arch A] [--upcycle-from CKPT] [--dry-run]
                             [fairseq-train options...]

fairseq-train for XSum (task translation, source = document, target = summary) with the paper's
setting: BART-large-sized encoder-decoder (--arch $DEFAULT_ARCH), MEO in every FFN linear,
8 experts, top-2, sequence-level routing; the fine-tuning recipe of fairseq's
examples/bart/README.summarization.md for XSum (label-smoothed cross-entropy 0.1, Adam
betas (0.9, 0.999), lr 3e-5 with polynomial decay over 15000 updates and 500 warmup updates,
clip-norm 0.1, --max-tokens 2048, --update-freq 2, dropout 0.1).

  --data DIR          output of scripts/prepare_xsum.sh
  --save-dir DIR      where the checkpoints go (checkpoint_best.pt, checkpoint_last.pt, train.log)
                      (a run resumes from DIR; one run at a time: a second one in DIR is refused)
  --arch A            meo_bart_large (default), meo_bart_base, meo_transformer, meo_transformer_tiny
  --upcycle-from CKPT initialise from a dense fairseq checkpoint of the same size (--moe-upcycle-from):
                      experts = copies of its FFNs, routers at zero (e.g. bart.large/model.pt; its
                      vocabulary is GPT-2 BPE: see examples/xsum/README.md)
  --dry-run           print the command and exit
  anything else       passed to fairseq-train after the recipe's options, so it overrides them:
                      e.g. --moe-mode moe, --moe-experts 16 --moe-top-k 4, --max-update 10, --lr 1e-4.
                      Giving --max-update N also sets --total-num-update N (the decay length) unless
                      --total-num-update is given.

$DEVICES_HELP
The recipe's batch is --max-tokens 2048 x --update-freq 2 per GPU; the fairseq recipe assumes
8 GPUs (keep GPUs x update-freq = 16 to keep its effective batch).
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF
}

recipe_args() {
  local total=15000
  if has_opt --max-update && ! has_opt --total-num-update; then
    total="$(opt_value --max-update)"
  fi
  RECIPE=(
    --task translation --source-lang src --target-lang tgt --truncate-source
    --share-all-embeddings --share-decoder-input-output-embed
    --required-batch-size-multiple 1
    --criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1
    --dropout 0.1 --attention-dropout 0.1
    --weight-decay 0.01 --optimizer adam --adam-betas "(0.9, 0.999)" --adam-eps 1e-08
    --clip-norm 0.1
    --lr-scheduler polynomial_decay --lr 3e-05 --total-num-update "$total" --warmup-updates 500
    --max-update 15000 --max-tokens 2048 --update-freq 2
    --skip-invalid-size-inputs-valid-test --find-unused-parameters
    --moe-mode meo --moe-level sequence --moe-experts 8 --moe-top-k 2
    --no-epoch-checkpoints --log-format simple --log-interval 100 --log-file "$SAVE_DIR/train.log"
  )
}

parse_train_args "$@"
check_data_dir "$DATA" dict.src.txt dict.tgt.txt train.src-tgt.src.idx train.src-tgt.tgt.idx valid.src-tgt.src.idx
run_train
