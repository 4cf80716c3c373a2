#!/usr/bin/env bash
# Prepare SQuAD v1.1 for fairseq as generative QA: source = "question <sep> context window",
# target = answer text, shared sentencepiece vocabulary. See --help.
# Deterministic: the same inputs and options give the same bytes; a re-run is a no-op.
set -euo pipefail
PROG=prepare_squad.sh
source "$(dirname "${BASH_SOURCE[0]}")/_prepare_common.sh"

usage() {
  cat <<EOF
Usage: scripts/prepare_squad.sh --out DIR [--raw DIR] [--vocab-size N] [--workers N]
                                [--max-source-tokens N] [--download-dir DIR]

Prepare SQuAD v1.1 for fairseq as a sequence-to-sequence task:
  source = "QUESTION <sep> CONTEXT-WINDOW", target = the answer text,
both encoded with ONE sentencepiece (unigram) model trained on the training questions, contexts
and answers ("<sep>" is a single piece), binarized with fairseq-preprocess --joined-dictionary.

Context window (deliberate truncation): a source line has at most N-1 sentencepiece pieces
(N = --max-source-tokens), so with the </s> that fairseq appends it fits --max-source-positions N.
Questions longer than half of that are cut. The context gets the remaining pieces, as whole words:
candidate windows form a sliding grid ("doc stride" of half a window) starting at the first word.
  train: the first window of the grid that contains the (first) answer whole, so every training
         target is answerable from its source;
  dev:   the first window (the answer is unknown at inference time); the script reports how many
         dev questions have no reference answer inside it (those cannot be answered exactly).

Options:
  --raw DIR              directory holding train-v1.1.json and dev-v1.1.json (SQuAD v1.1 format).
                         Without --raw both are downloaded from the SQuAD explorer site to
                         --download-dir (network needed).
  --out DIR              output directory. Written atomically (staged next to it, then moved); an
                         existing DIR must hold an earlier output of this script: only the files
                         that output wrote are replaced, anything else in DIR is kept.
  --vocab-size N         sentencepiece vocabulary size (default 32000)
  --max-source-tokens N  source length limit in tokens, </s> included (default 512)
  --workers N            threads/processes for encoding and fairseq-preprocess (default: cores, max 8)
  --download-dir DIR     where the download goes without --raw (default: DIR.download next to --out)
  -h, --help             show this help and exit

Output in --out:
  train.src-tgt.{src,tgt}.{bin,idx}        training data (target = first answer)
  {valid,test}.src-tgt.{src,tgt}.{bin,idx} the dev set, twice (valid for validation loss, test
                                           for fairseq-generate --gen-subset test)
  dict.src.txt, dict.tgt.txt               the joined fairseq dictionary (= sentencepiece pieces)
  spm.model, spm.vocab                     the sentencepiece model
  {train,valid,test}.id                    question ids, one a line, in the binarized order
  dev.answers.jsonl                        {"id": ..., "answers": [all reference answers]} per dev
                                           question, for exact match / F1
  preprocess.log, prepare.stamp            fairseq-preprocess log; hash of inputs + options

Bad input (missing file, malformed JSON, missing field, empty file) stops the script with a message
naming the file and the line (JSON syntax) or JSON path (structure); nothing is left in --out.
EOF
}

RAW="" OUT="" VOCAB_SIZE=32000 WORKERS="$(default_workers)" DOWNLOAD_DIR="" MAX_SOURCE_TOKENS=512
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --raw) need_value "$1" "$#"; RAW="$2"; shift 2 ;;
    --out) need_value "$1" "$#"; OUT="$2"; shift 2 ;;
    --vocab-size) need_value "$1" "$#"; VOCAB_SIZE="$2"; shift 2 ;;
    --workers) need_value "$1" "$#"; WORKERS="$2"; shift 2 ;;
    --max-source-tokens) need_value "$1" "$#"; MAX_SOURCE_TOKENS="$2"; shift 2 ;;
    --download-dir) need_value "$1" "$#"; DOWNLOAD_DIR="$2"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || { usage >&2; die "--out is required"; }
check_int --vocab-size "$VOCAB_SIZE" 8
check_int --workers "$WORKERS" 1
check_int --max-source-tokens "$MAX_SOURCE_TOKENS" 16
OUT="$(abs_path "$OUT")"

resolve_raw squad "SQuAD v1.1"

mapfile -t INPUTS < <(prep input-files squad --raw "$RAW") && [[ ${#INPUTS[@]} -eq 2 ]] \
  || die "input files missing (see the message above)"
make_stamp "vocab_size $VOCAB_SIZE" "max_source_tokens $MAX_SOURCE_TOKENS" -- "${INPUTS[@]}"
begin_output

log "reading, validating and encoding $RAW"
prep squad --raw "$RAW" --out "$WORK/out" --text-dir "$WORK/text" --vocab-size "$VOCAB_SIZE" \
  --max-source-tokens "$MAX_SOURCE_TOKENS" --workers "$WORKERS" || die "preparing SQuAD failed (see above)"

run_preprocess --source-lang src --target-lang tgt --joined-dictionary --srcdict dict.txt \
  --trainpref train --validpref valid --testpref valid
finish_output
