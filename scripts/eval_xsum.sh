#!/usr/bin/env bash
# Summarize the XSum test set with a trained checkpoint and score it with ROUGE. See --help.
set -euo pipefail
PROG=eval_xsum.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"

usage() {
  cat <<EOF2
Usage: scripts/eval_xsum.sh --data DIR --checkpoint PATH --out DIR [--subset test|valid]
                            [--beam 6] [--lenpen 1.0] [--max-len-b 60] [--min-len 10]
                            [--no-repeat-ngram-size 3] [--batch-size 32] [--bpe spm|gpt2]
                            [fairseq-generate options...]

1. fairseq-generate (with --user-dir meo_fairseq) on the --subset split of --data with beam search;
   the defaults are the paper's / fairseq's XSum decoding settings (beam 6, length penalty 1.0,
   at most 60 tokens, at least 10, no repeated 3-grams). --truncate-source and the source/target
   length limits are those the checkpoint was trained with.
2. Hypotheses in id order, sentencepiece-decoded (--bpe gpt2: fairseq's GPT-2 BPE decoding, for
   data prepared with BART's vocabulary), one line per example: OUT/hyp.txt
3. ROUGE-1/2/L F-measure (rouge-score, Porter stemmer) against SUBSET.tgt.raw: printed and written
   to OUT/rouge.json.

  --data DIR         output of scripts/prepare_xsum.sh (needs SUBSET.id and SUBSET.tgt.raw)
  --checkpoint PATH  e.g. SAVE_DIR/checkpoint_best.pt of scripts/train_xsum.sh
  --out DIR          output directory: generate-SUBSET.txt (raw fairseq-generate output),
                     hyp.txt, rouge.json
  anything else      passed to fairseq-generate (e.g. --fp16 on a GPU, --max-tokens 8000, --cpu)
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

SUBSET=test BEAM=6 LENPEN=1.0 MAX_LEN_B=60 MIN_LEN=10 NO_REPEAT=3 BATCH=32 BPE=spm
declare -A EVAL_OPTS=([--beam]=BEAM [--lenpen]=LENPEN [--max-len-b]=MAX_LEN_B [--min-len]=MIN_LEN [--no-repeat-ngram-size]=NO_REPEAT [--batch-size]=BATCH [--bpe]=BPE)
parse_eval_args "$@"
check_int --beam "$BEAM" 1
check_int --max-len-b "$MAX_LEN_B" 1
check_int --min-len "$MIN_LEN" 0
check_int --no-repeat-ngram-size "$NO_REPEAT" 0
check_int --batch-size "$BATCH" 1
[[ "$BPE" == spm || "$BPE" == gpt2 ]] || die "--bpe must be spm or gpt2, got '$BPE'"
check_data_dir "$DATA" dict.src.txt dict.tgt.txt "$SUBSET.src-tgt.src.idx" "$SUBSET.id" "$SUBSET.tgt.raw"
check_checkpoint "$CKPT"
DATA="$(abs_path "$DATA")" CKPT="$(abs_path "$CKPT")" OUT="$(abs_path "$OUT")"

run_generate "$DATA" "$CKPT" "$OUT" "$SUBSET" "$BPE" \
  --beam "$BEAM" --lenpen "$LENPEN" --max-len-a 0 --max-len-b "$MAX_LEN_B" --min-len "$MIN_LEN" \
  --no-repeat-ngram-size "$NO_REPEAT" --batch-size "$BATCH" "${EXTRA[@]+"${EXTRA[@]}"}"

cmd=("$PY" -m meo_fairseq.scoring.rouge --hyp "$OUT/hyp.txt" --ref "$DATA/$SUBSET.tgt.raw" --out "$OUT/rouge.json")
print_cmd "${cmd[@]}"
"${cmd[@]}" || die "ROUGE scoring failed"
log "wrote $OUT/hyp.txt and $OUT/rouge.json"
