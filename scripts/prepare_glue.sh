#!/usr/bin/env bash
# Prepare GLUE tasks for fairseq's sentence_prediction task (input0 / input1 / label), as fairseq's
# examples/roberta/preprocess_GLUE_tasks.sh does. See --help.
# Deterministic: the same inputs and options give the same bytes; a re-run is a no-op.
set -euo pipefail
PROG=prepare_glue.sh
source "$(dirname "${BASH_SOURCE[0]}")/_prepare_common.sh"
GLUE_PY="$REPO_DIR/meo_fairseq/data/glue.py"
glue() { "$PY" "$GLUE_PY" "$@"; }

usage() {
  cat <<EOF
Usage: scripts/prepare_glue.sh --task NAME --glue-dir DIR --out DIR
                               [--bpe spm [--spm-model FILE --dict FILE | --vocab-size N]]
                               [--bpe gpt2 --encoder-json FILE --vocab-bpe FILE --dict FILE]
                               [--workers N]

Prepare one GLUE task (or all nine) from the TSV files of the standard GLUE download
(glue_data/TASK/{train,dev,test}.tsv) for fairseq-train --task sentence_prediction:
the columns fairseq's preprocess_GLUE_tasks.sh reads, inputs encoded with the model's subword
vocabulary and binarized with its dictionary, labels binarized with a label dictionary (STS-B:
the scores divided by 5, as text files, for --regression-target).

Tasks: $(glue tasks | tr '\n' ' ')(names are case-insensitive, the hyphen optional),
       or ALL (every task whose folder exists in --glue-dir, each into --out/TASK-bin).

Options:
  --task NAME          the GLUE task (see above)
  --glue-dir DIR       the GLUE download (holds TASK/train.tsv, TASK/dev.tsv, optionally test.tsv;
                       MNLI: dev_matched/dev_mismatched, test_matched/test_mismatched). Alias: --raw
  --out DIR            output directory (--task ALL: the parent of the TASK-bin directories).
                       Written atomically (staged next to it, then moved); an existing DIR is
                       replaced only if it holds an earlier output of this script.
  --bpe spm|gpt2       subword encoding (default spm)
                       gpt2: fine-tuning a released RoBERTa (roberta.base / roberta.large): its
                             GPT-2 BPE --encoder-json encoder.json --vocab-bpe vocab.bpe and
                             fairseq dictionary --dict dict.txt (as preprocess_GLUE_tasks.sh)
                       spm:  a model trained here: --spm-model spm.model and --dict dict.txt of its
                             pretraining data (scripts/prepare_wikitext.sh writes both); without
                             --spm-model a sentencepiece model of --vocab-size pieces (default 8000)
                             is trained on the task's training inputs (training from scratch)
  --workers N          threads for encoding and fairseq-preprocess (default: cores, max 8)
  -h, --help           show this help and exit

Output in --out:
  input0/, input1/ (pair tasks)  {train,valid,test}.{bin,idx} and dict.txt (MNLI: valid = dev_matched,
                                 valid1 = dev_mismatched, test/test1 likewise); test only where
                                 the GLUE folder has a test file
  label/                         {train,valid}.{bin,idx} and dict.txt (STS-B: {train,valid}.label)
  splits.txt                     "fairseq-split glue-file examples" per split
  spm.model, spm.vocab           (--bpe spm without --spm-model) the sentencepiece model
  prepare.stamp                  hash of inputs + options

Bad input (missing file, a row without the task's columns, an empty input or label, a
non-numeric STS-B score) stops the script with a message naming the file and the line; nothing
is left in --out.
EOF
}

TASK="" GLUE_DIR="" OUT="" BPE=spm SPM_MODEL="" DICT="" VOCAB_SIZE=8000 ENCODER_JSON="" VOCAB_BPE=""
WORKERS="$(default_workers)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --task) need_value "$1" "$#"; TASK="$2"; shift 2 ;;
    --glue-dir|--raw) need_value "$1" "$#"; GLUE_DIR="$2"; shift 2 ;;
    --out) need_value "$1" "$#"; OUT="$2"; shift 2 ;;
    --bpe) need_value "$1" "$#"; BPE="$2"; shift 2 ;;
    --spm-model) need_value "$1" "$#"; SPM_MODEL="$2"; shift 2 ;;
    --dict) need_value "$1" "$#"; DICT="$2"; shift 2 ;;
    --vocab-size) need_value "$1" "$#"; VOCAB_SIZE="$2"; shift 2 ;;
    --encoder-json) need_value "$1" "$#"; ENCODER_JSON="$2"; shift 2 ;;
    --vocab-bpe) need_value "$1" "$#"; VOCAB_BPE="$2"; shift 2 ;;
    --workers) need_value "$1" "$#"; WORKERS="$2"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$TASK" ]] || { usage >&2; die "--task is required"; }
[[ -n "$GLUE_DIR" ]] || { usage >&2; die "--glue-dir is required"; }
[[ -n "$OUT" ]] || { usage >&2; die "--out is required"; }
check_int --workers "$WORKERS" 1
check_int --vocab-size "$VOCAB_SIZE" 8
[[ -d "$GLUE_DIR" ]] || die "--glue-dir $GLUE_DIR is not a directory"
GLUE_DIR="$(abs_path "$GLUE_DIR")"
OUT="$(abs_path "$OUT")"

BPE_FILES=()
case "$BPE" in
  gpt2)
    [[ -n "$ENCODER_JSON" && -n "$VOCAB_BPE" && -n "$DICT" ]] \
      || die "--bpe gpt2 needs --encoder-json, --vocab-bpe and --dict (the released RoBERTa's GPT-2 BPE files)"
    [[ -z "$SPM_MODEL" ]] || die "--spm-model is for --bpe spm"
    BPE_FILES=("$ENCODER_JSON" "$VOCAB_BPE" "$DICT") ;;
  spm)
    [[ -z "$ENCODER_JSON$VOCAB_BPE" ]] || die "--encoder-json / --vocab-bpe are for --bpe gpt2"
    if [[ -n "$SPM_MODEL" || -n "$DICT" ]]; then
      [[ -n "$SPM_MODEL" && -n "$DICT" ]] || die "--bpe spm: give both --spm-model and --dict (or neither, to train one)"
      BPE_FILES=("$SPM_MODEL" "$DICT")
    fi ;;
  *) die "--bpe must be spm or gpt2, got '$BPE'" ;;
esac
for f in "${BPE_FILES[@]+"${BPE_FILES[@]}"}"; do
  [[ -f "$f" && -s "$f" ]] || die "$f: no such file, or empty"
done
for v in SPM_MODEL DICT ENCODER_JSON VOCAB_BPE; do
  [[ -z "${!v}" ]] || printf -v "$v" '%s' "$(abs_path "${!v}")"
done

if [[ "${TASK^^}" == ALL ]]; then
  mapfile -t NAMES < <(glue tasks)
  found=0
  for name in "${NAMES[@]}"; do
    [[ -d "$GLUE_DIR/$name" ]] || continue
    found=1
    args=(--task "$name" --glue-dir "$GLUE_DIR" --out "$OUT/$name-bin" --bpe "$BPE" --workers "$WORKERS"
          --vocab-size "$VOCAB_SIZE")
    [[ -z "$SPM_MODEL" ]] || args+=(--spm-model "$SPM_MODEL")
    [[ -z "$DICT" ]] || args+=(--dict "$DICT")
    [[ -z "$ENCODER_JSON" ]] || args+=(--encoder-json "$ENCODER_JSON" --vocab-bpe "$VOCAB_BPE")
    bash "$0" "${args[@]}" || die "preparing $name failed (see above)"
  done
  (( found )) || die "--glue-dir $GLUE_DIR holds none of the task folders: ${NAMES[*]}"
  exit 0
fi

INFO="$(glue task-info "$TASK")" || die "--task: see the message above"
read -r TASK NUM_CLASSES NUM_INPUTS _METRIC <<< "$INFO"

mapfile -t INPUTS < <(glue input-files "$TASK" --glue-dir "$GLUE_DIR") && (( ${#INPUTS[@]} >= 2 )) \
  || die "input files missing (see the message above)"
bpe_opts=("bpe $BPE")
[[ "$BPE" != spm || -n "$SPM_MODEL" ]] || bpe_opts+=("vocab_size $VOCAB_SIZE")
make_stamp "task $TASK" "${bpe_opts[@]}" "glue_code $(_sha256 < "$GLUE_PY")" -- \
  "${INPUTS[@]}" "${BPE_FILES[@]+"${BPE_FILES[@]}"}"
begin_output

log "reading, validating and encoding $GLUE_DIR/$TASK ($BPE)"
prep_args=(prepare "$TASK" --glue-dir "$GLUE_DIR" --text-dir "$WORK/text" --out "$WORK/out" --bpe "$BPE"
           --workers "$WORKERS" --vocab-size "$VOCAB_SIZE")
[[ -z "$SPM_MODEL" ]] || prep_args+=(--spm-model "$SPM_MODEL")
[[ -z "$ENCODER_JSON" ]] || prep_args+=(--encoder-json "$ENCODER_JSON" --vocab-bpe "$VOCAB_BPE")
glue "${prep_args[@]}" || die "preparing $TASK failed (see above)"
[[ -z "$DICT" ]] || cp "$DICT" "$WORK/text/dict.txt"

# binarize NAME PREPROCESS-ARGS...: fairseq-preprocess --only-source inside WORK/text into
# WORK/out/NAME (relative paths and no Namespace line: the log is the same on every run)
binarize() {
  local name="$1"
  shift
  (cd "$WORK/text" && "$PY" -m fairseq_cli.preprocess --only-source "$@" --destdir "../out/$name" \
      --workers "$WORKERS" > /dev/null) || die "fairseq-preprocess ($name) failed"
  if [[ -f "$WORK/out/$name/preprocess.log" ]]; then
    grep -v '^Namespace(' "$WORK/out/$name/preprocess.log" > "$WORK/preprocess.log" || true
    mv "$WORK/preprocess.log" "$WORK/out/$name/preprocess.log"
  fi
}

# split_files GLOB: the matching files of WORK/text, comma-separated, in fairseq's split order
# (valid.input0,valid1.input0): fairseq-preprocess numbers the prefixes of one option that way
split_files() {
  (cd "$WORK/text" && compgen -G "$1" | LC_ALL=C sort | paste -sd, -) || true
}

log "binarizing with fairseq-preprocess"
for (( i = 0; i < NUM_INPUTS; i++ )); do
  lang="input$i"
  splits=(--trainpref "train.$lang" --validpref "$(split_files "valid*.$lang")")
  tests="$(split_files "test*.$lang")"
  [[ -z "$tests" ]] || splits+=(--testpref "$tests")
  binarize "$lang" "${splits[@]}" --srcdict dict.txt
done
if (( NUM_CLASSES == 1 )); then
  mkdir "$WORK/out/label"
  for f in "$WORK"/text/*.label; do cp "$f" "$WORK/out/label/"; done
else
  binarize label --trainpref train.label --validpref "$(split_files "valid*.label")"
fi
finish_output
