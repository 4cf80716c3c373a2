#!/usr/bin/env bash
# Train an MEO / MoE generative question-answering model on SQuAD v1.1 prepared by
# scripts/prepare_squad.sh. See --help.
set -euo pipefail
PROG=train_squad.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
DEFAULT_ARCH=meo_transformer

usage() {
  cat <<EOF2
Usage: scripts/train_squad.sh --data DIR --save-dir DIR [--arch A] [--upcycle-from CKPT] [--dry-run]
                              [fairseq-train options...]

fairseq-train for SQuAD v1.1 as sequence-to-sequence QA (task translation, source = "question
<sep> context window", target = answer) with MEO in every FFN linear, 8 experts, top-2,
sequence-level routing (the paper: T5-small with 8 experts). The model is fairseq's
encoder-decoder transformer (--arch $DEFAULT_ARCH: 6+6 layers, 512/2048) trained from scratch
with fairseq's transformer recipe: label-smoothed cross-entropy 0.1, Adam betas (0.9, 0.98),
lr 5e-4 inverse_sqrt with 4000 warmup updates, dropout 0.1, weight decay 1e-4, --max-tokens 4096,
30000 updates, shared source/target embeddings.

  --data DIR          output of scripts/prepare_squad.sh
  --save-dir DIR      where the checkpoints go (checkpoint_best.pt, checkpoint_last.pt, train.log)
                      (a run resumes from DIR; one run at a time: a second one in DIR is refused)
  --arch A            meo_transformer (default), meo_transformer_tiny, meo_bart_base, meo_bart_large
  --upcycle-from CKPT initialise from a dense fairseq checkpoint of the same size (--moe-upcycle-from),
                      e.g. bart.base/model.pt with --arch meo_bart_base (GPT-2 BPE vocabulary: see
                      examples/squad/README.md)
  --dry-run           print the command and exit
  anything else       passed to fairseq-train after the recipe's options, so it overrides them:
                      e.g. --moe-top-k 8, --moe-mode moe, --max-update 10, --max-tokens 1024.

$DEVICES_HELP
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

recipe_args() {
  RECIPE=(
    --task translation --source-lang src --target-lang tgt --truncate-source
    --share-all-embeddings
    --criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1
    --dropout 0.1 --weight-decay 0.0001
    --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0
    --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07
    --max-tokens 4096 --max-update 30000
    --required-batch-size-multiple 1
    --skip-invalid-size-inputs-valid-test --find-unused-parameters
    --moe-mode meo --moe-level sequence --moe-experts 8 --moe-top-k 2
    --no-epoch-checkpoints --log-format simple --log-interval 100 --log-file "$SAVE_DIR/train.log"
  )
}

parse_train_args "$@"
check_data_dir "$DATA" dict.src.txt dict.tgt.txt train.src-tgt.src.idx train.src-tgt.tgt.idx valid.src-tgt.src.idx
run_train
