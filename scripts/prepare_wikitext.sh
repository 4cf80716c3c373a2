#!/usr/bin/env bash
# Prepare WikiText (103, or any wiki.{train,valid,test}.{tokens,raw} set) for fairseq language
# modelling (--only-source). See --help.
# Deterministic: the same inputs and options give the same bytes; a re-run is a no-op.
set -euo pipefail
PROG=prepare_wikitext.sh
source "$(dirname "${BASH_SOURCE[0]}")/_prepare_common.sh"

usage() {
  cat <<EOF
Usage: scripts/prepare_wikitext.sh --out DIR [--raw DIR] [--format tokens|raw] [--vocab-size N]
                                   [--workers N] [--download-dir DIR]

Prepare WikiText for fairseq language modelling (fairseq-preprocess --only-source).

  tokens format (wiki.{train,valid,test}.tokens, the tokenized release with <unk>): the tokens are
      kept as they are, no BPE, as in fairseq's examples/language_model recipe; the dictionary is
      built from the training split (all words, unless --vocab-size is given).
  raw format (wiki.{train,valid,test}.raw): a sentencepiece (unigram) model is trained on the
      training split and every line is encoded with it; the dictionary is its vocabulary.
Line structure is kept in both: one input line = one output line (empty lines included).

Options:
  --raw DIR           directory holding the three split files of one format. Without --raw,
                      WikiText-103 (wikitext-103-v1.zip, or wikitext-103-raw-v1.zip with
                      --format raw) is downloaded and unzipped into --download-dir (network needed).
  --format F          tokens or raw (default: detected from the file names in --raw; tokens
                      when downloading)
  --out DIR           output directory. Written atomically (staged next to it, then moved); an
                      existing DIR must hold an earlier output of this script: only the files
                      that output wrote are replaced, anything else in DIR is kept.
  --vocab-size N      raw: sentencepiece vocabulary size (default 32000);
                      tokens: keep only the N most frequent words (default: all words)
  --workers N         threads/processes for encoding and fairseq-preprocess (default: cores, max 8)
  --download-dir DIR  where the download goes without --raw (default: DIR.download next to --out)
  -h, --help          show this help and exit

Output in --out:
  {train,valid,test}.{bin,idx}   binarized splits
  dict.txt                       the fairseq dictionary
  spm.model, spm.vocab           (raw format only) the sentencepiece model
  preprocess.log, prepare.stamp  fairseq-preprocess log; hash of inputs + options (re-run = no-op)

Bad input (missing split file, empty file, text that is not UTF-8) stops the script with a message
naming the file (and line); nothing is left in --out.
EOF
}

RAW="" OUT="" VOCAB_SIZE="" WORKERS="$(default_workers)" DOWNLOAD_DIR="" FORMAT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --raw) need_value "$1" "$#"; RAW="$2"; shift 2 ;;
    --out) need_value "$1" "$#"; OUT="$2"; shift 2 ;;
    --format) need_value "$1" "$#"; FORMAT="$2"; shift 2 ;;
    --vocab-size) need_value "$1" "$#"; VOCAB_SIZE="$2"; shift 2 ;;
    --workers) need_value "$1" "$#"; WORKERS="$2"; shift 2 ;;
    --download-dir) need_value "$1" "$#"; DOWNLOAD_DIR="$2"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$OUT" ]] || { usage >&2; die "--out is required"; }
[[ -z "$FORMAT" || "$FORMAT" == tokens || "$FORMAT" == raw ]] || die "--format must be tokens or raw, got '$FORMAT'"
[[ -z "$VOCAB_SIZE" ]] || check_int --vocab-size "$VOCAB_SIZE" 8
check_int --workers "$WORKERS" 1
OUT="$(abs_path "$OUT")"

[[ -n "$RAW" ]] || FORMAT="${FORMAT:-tokens}"
resolve_raw "wikitext-${FORMAT:-tokens}" "WikiText-103 (${FORMAT:-tokens})"
if [[ -z "$FORMAT" ]]; then
  FORMAT="$(prep input-files wikitext --raw "$RAW")" || die "cannot tell the format of $RAW (see above)"
  log "format: $FORMAT (from the file names in $RAW)"
fi
if [[ "$FORMAT" == raw ]]; then VOCAB_SIZE="${VOCAB_SIZE:-32000}"; fi

mapfile -t INPUTS < <(prep input-files "wikitext-$FORMAT" --raw "$RAW") && [[ ${#INPUTS[@]} -eq 3 ]] \
  || die "input files missing (see the message above)"
make_stamp "format $FORMAT" "vocab_size ${VOCAB_SIZE:-all}" -- "${INPUTS[@]}"
begin_output

if [[ "$FORMAT" == tokens ]]; then
  log "checking $RAW"
  prep check-text "${INPUTS[@]}" || die "bad input (see above)"
  for i in 0 1 2; do
    split=(train valid test)
    ln -s "${INPUTS[$i]}" "$WORK/text/${split[$i]}.txt"
  done
  extra=()
  [[ -z "$VOCAB_SIZE" ]] || extra=(--nwordssrc "$VOCAB_SIZE")
  run_preprocess --only-source --trainpref train.txt --validpref valid.txt --testpref test.txt "${extra[@]}"
else
  log "reading, validating and encoding $RAW"
  prep wikitext-raw --raw "$RAW" --out "$WORK/out" --text-dir "$WORK/text" \
    --vocab-size "$VOCAB_SIZE" --workers "$WORKERS" || die "preparing WikiText failed (see above)"
  run_preprocess --only-source --srcdict dict.txt --trainpref train.txt --validpref valid.txt --testpref test.txt
fi
finish_output
