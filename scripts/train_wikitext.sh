#!/usr/bin/env bash
# Train an MEO / MoE language model on WikiText prepared by scripts/prepare_wikitext.sh. See --help.
set -euo pipefail
PROG=train_wikitext.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
DEFAULT_ARCH=meo_transformer_lm_gpt2_small

usage() {
  cat <<EOF2
Usage: scripts/train_wikitext.sh --data DIR --save-dir DIR [--arch A] [--upcycle-from CKPT] [--dry-run]
                                 [fairseq-train options...]

fairseq-train for language modelling (task language_modeling) with the paper's setting:
MEO in every FFN linear, 8 experts, top-2 (decoder routing: causal "segment" routing, the
plugin's default for language models), in the sizes of fairseq's transformer_lm_gpt2_small
(--arch $DEFAULT_ARCH: 24 layers, 1024/4096, 16 heads). That is fairseq's
naming: OpenAI's GPT-2 small, the paper's model, has 12 layers of 768/3072 and 12 heads; add
--decoder-layers 12 --decoder-embed-dim 768 --decoder-ffn-embed-dim 3072
--decoder-attention-heads 12 for that size.
The recipe is fairseq's examples/language_model/README.md: --tokens-per-sample 512
--sample-break-mode none, Adam betas (0.9, 0.98), weight decay 0.01, lr 5e-4 inverse_sqrt with
4000 warmup updates from 1e-7, dropout 0.1, --max-tokens 2048 --update-freq 16, 50000 updates,
shared input/output embeddings, cross-entropy (plus the experts' auxiliary losses).

  --data DIR          output of scripts/prepare_wikitext.sh
  --save-dir DIR      where the checkpoints go (checkpoint_best.pt, checkpoint_last.pt, train.log)
                      (a run resumes from DIR; one run at a time: a second one in DIR is refused)
  --arch A            meo_transformer_lm_gpt2_small (default), meo_transformer_lm_gpt2_medium,
                      meo_transformer_lm, meo_transformer_lm_tiny
  --upcycle-from CKPT initialise from a dense fairseq transformer_lm checkpoint of the same size
                      (--moe-upcycle-from)
  --dry-run           print the command and exit
  anything else       passed to fairseq-train after the recipe's options, so it overrides them:
                      e.g. --moe-mode moe --moe-level token, --moe-segment-length 128,
                      --max-update 10, --tokens-per-sample 128.

The recipe's 50000 updates are for WikiText-103; WikiText-2 (the paper's data, ~2M tokens) is
~60 updates per epoch at the recipe's batch: use fewer updates or --patience (see
examples/wikitext/README.md).

$DEVICES_HELP
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

recipe_args() {
  RECIPE=(
    --task language_modeling --tokens-per-sample 512 --sample-break-mode none
    --share-decoder-input-output-embed
    --criterion moe_cross_entropy
    --dropout 0.1
    --optimizer adam --adam-betas "(0.9, 0.98)" --weight-decay 0.01 --clip-norm 0.0
    --lr 0.0005 --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07
    --max-tokens 2048 --update-freq 16 --max-update 50000
    --required-batch-size-multiple 1
    --find-unused-parameters
    --moe-mode meo --moe-level sequence --moe-experts 8 --moe-top-k 2
    --no-epoch-checkpoints --log-format simple --log-interval 100 --log-file "$SAVE_DIR/train.log"
  )
}

parse_train_args "$@"
check_data_dir "$DATA" dict.txt train.idx train.bin valid.idx
run_train
