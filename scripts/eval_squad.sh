#!/usr/bin/env bash
# Answer the SQuAD v1.1 dev questions with a trained checkpoint; exact match and F1. See --help.
set -euo pipefail
PROG=eval_squad.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"

usage() {
  cat <<EOF2
Usage: scripts/eval_squad.sh --data DIR --checkpoint PATH --out DIR [--subset test|valid]
                             [--beam 5] [--lenpen 1.0] [--max-len-b 30] [--min-len 1]
                             [--batch-size 64] [--bpe spm|gpt2] [fairseq-generate options...]

1. fairseq-generate (with --user-dir meo_fairseq) on the --subset split of --data (prepare_squad.sh
   writes the dev questions as both valid and test) with beam search: beam 5, at most 30 tokens
   (the answer-length limit of the authors' seq2seq QA script). --truncate-source and the length
   limits are those the checkpoint was trained with.
2. Predicted answers in id order, sentencepiece-decoded (--bpe gpt2: fairseq's GPT-2 BPE
   decoding), one line per question: OUT/hyp.txt
3. SQuAD v1.1 exact match and F1 (the official normalisation; maximum over the reference answers;
   percentages over all questions) against dev.answers.jsonl: printed and written to OUT/squad.json.

  --data DIR         output of scripts/prepare_squad.sh (needs SUBSET.id and dev.answers.jsonl)
  --checkpoint PATH  e.g. SAVE_DIR/checkpoint_best.pt of scripts/train_squad.sh
  --out DIR          output directory: generate-SUBSET.txt (raw fairseq-generate output),
                     hyp.txt, squad.json
  anything else      passed to fairseq-generate (e.g. --fp16 on a GPU, --no-repeat-ngram-size 3, --cpu)
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

SUBSET=test BEAM=5 LENPEN=1.0 MAX_LEN_B=30 MIN_LEN=1 BATCH=64 BPE=spm
declare -A EVAL_OPTS=([--beam]=BEAM [--lenpen]=LENPEN [--max-len-b]=MAX_LEN_B [--min-len]=MIN_LEN [--batch-size]=BATCH [--bpe]=BPE)
parse_eval_args "$@"
check_int --beam "$BEAM" 1
check_int --max-len-b "$MAX_LEN_B" 1
check_int --min-len "$MIN_LEN" 0
check_int --batch-size "$BATCH" 1
[[ "$BPE" == spm || "$BPE" == gpt2 ]] || die "--bpe must be spm or gpt2, got '$BPE'"
check_data_dir "$DATA" dict.src.txt dict.tgt.txt "$SUBSET.src-tgt.src.idx" "$SUBSET.id" dev.answers.jsonl
check_checkpoint "$CKPT"
DATA="$(abs_path "$DATA")" CKPT="$(abs_path "$CKPT")" OUT="$(abs_path "$OUT")"

run_generate "$DATA" "$CKPT" "$OUT" "$SUBSET" "$BPE" \
  --beam "$BEAM" --lenpen "$LENPEN" --max-len-a 0 --max-len-b "$MAX_LEN_B" --min-len "$MIN_LEN" \
  --batch-size "$BATCH" "${EXTRA[@]+"${EXTRA[@]}"}"

cmd=("$PY" -m meo_fairseq.scoring.squad --hyp "$OUT/hyp.txt" --ids "$DATA/$SUBSET.id"
     --ref "$DATA/dev.answers.jsonl" --out "$OUT/squad.json")
print_cmd "${cmd[@]}"
"${cmd[@]}" || die "SQuAD scoring failed"
log "wrote $OUT/hyp.txt and $OUT/squad.json"
