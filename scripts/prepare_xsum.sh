#!/usr/bin/env bash
# Prepare XSum for fairseq (source = document, target = summary, shared sentencepiece vocabulary).
# See --help. Deterministic: the same inputs and options give the same bytes; a re-run is a no-op.
set -euo pipefail
PROG=prepare_xsum.sh
source "$(dirname "${BASH_SOURCE[0]}")/_prepare_common.sh"

usage() {
  cat <<EOF
Usage: scripts/prepare_xsum.sh --out DIR [--raw DIR] [--vocab-size N] [--workers N] [--download-dir DIR]

Prepare XSum (extreme summarization) for fairseq: source = document, target = summary, both
encoded with ONE sentencepiece (unigram) model trained on the training documents and summaries,
then binarized with fairseq-preprocess --joined-dictionary (dictionary = sentencepiece vocabulary).
All text is whitespace-normalised (newlines in documents become spaces): one example per line.

Options:
  --raw DIR           directory holding train.jsonl, validation.jsonl (or valid.jsonl), test.jsonl:
                      JSON lines with string fields "id", "document", "summary" (the fields of the
                      Hugging Face data set EdinburghNLP/xsum). Without --raw, the parquet files of
                      EdinburghNLP/xsum are downloaded (network and pyarrow needed) to --download-dir.
  --out DIR           output directory. Written atomically (staged next to it, then moved); an
                      existing DIR must hold an earlier output of this script: only the files
                      that output wrote are replaced, anything else in DIR is kept.
  --vocab-size N      sentencepiece vocabulary size (default 32000)
  --workers N         threads/processes for encoding and fairseq-preprocess (default: cores, max 8)
  --download-dir DIR  where the download goes without --raw (default: DIR.download next to --out)
  -h, --help          show this help and exit

Output in --out:
  {train,valid,test}.src-tgt.{src,tgt}.{bin,idx}  binarized splits (valid = validation)
  dict.src.txt, dict.tgt.txt      the joined fairseq dictionary (= sentencepiece pieces)
  spm.model, spm.vocab            the sentencepiece model (decode generated pieces with it)
  {train,valid,test}.id           example ids, one a line, in the binarized order
  {valid,test}.tgt.raw            reference summaries (whitespace-normalised), for ROUGE
  preprocess.log, prepare.stamp   fairseq-preprocess log; hash of inputs + options (re-run = no-op)

Bad input (missing split file, malformed JSON line, missing field, empty file) stops the script
with a message naming the file and line; nothing is left in --out.
EOF
}

RAW="" OUT="" VOCAB_SIZE=32000 WORKERS="$(default_workers)" DOWNLOAD_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --raw) need_value "$1" "$#"; RAW="$2"; shift 2 ;;
    --out) need_value "$1" "$#"; OUT="$2"; shift 2 ;;
    --vocab-size) need_value "$1" "$#"; VOCAB_SIZE="$2"; shift 2 ;;
    --workers) need_value "$1" "$#"; WORKERS="$2"; shift 2 ;;
    --download-dir) need_value "$1" "$#"; DOWNLOAD_DIR="$2"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || { usage >&2; die "--out is required"; }
check_int --vocab-size "$VOCAB_SIZE" 8
check_int --workers "$WORKERS" 1
OUT="$(abs_path "$OUT")"

resolve_raw xsum "the EdinburghNLP/xsum parquet files"

mapfile -t INPUTS < <(prep input-files xsum --raw "$RAW") && [[ ${#INPUTS[@]} -eq 3 ]] \
  || die "input files missing (see the message above)"
make_stamp "vocab_size $VOCAB_SIZE" -- "${INPUTS[@]}"
begin_output

log "reading, validating and encoding $RAW"
prep xsum --raw "$RAW" --out "$WORK/out" --text-dir "$WORK/text" \
  --vocab-size "$VOCAB_SIZE" --workers "$WORKERS" || die "preparing XSum failed (see above)"

run_preprocess --source-lang src --target-lang tgt --joined-dictionary --srcdict dict.txt \
  --trainpref train --validpref valid --testpref test
finish_output
