# Helpers shared by scripts/prepare_{xsum,wikitext,squad}.sh (sourced, not run).
#
# The calling script sets PROG and defines usage(). The flow is:
#   parse options -> resolve_raw (download when there is no --raw) -> make_stamp (hash of the
#   inputs, options and this code) -> begin_output (no-op exit if OUT already holds that stamp;
#   else a staging dir WORK next to OUT) -> the data set's own steps write WORK/out and WORK/text
#   -> run_preprocess -> finish_output (stamp, then mv WORK/out to OUT).
# Nothing is written into OUT until the final mv; WORK is removed on any exit.

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
PREP_PY="$REPO_DIR/meo_fairseq/data/prepare.py"
export PYTHONHASHSEED=0
WORK=""

# Run the Python helper as a file: it needs neither fairseq nor the meo_fairseq package __init__.
prep() { "$PY" "$PREP_PY" "$@"; }

_sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1; else shasum -a 256 | cut -d' ' -f1; fi
}

# make_stamp "key value" ... -- FILE ...: sets STAMP (first line "sha256 HASH", then the details).
# The hash covers the options that change the output, the input files' contents (not their paths,
# so the same data elsewhere gives the same stamp), this code and the sentencepiece version.
# resolve_raw DATASET WHAT: RAW is --raw, or (without it) where DATASET was downloaded into
# --download-dir (default OUT.download); checked and made absolute.
resolve_raw() {
  if [[ -z "$RAW" ]]; then
    local dl="${DOWNLOAD_DIR:-$OUT.download}"
    log "no --raw: downloading $2 to $dl"
    RAW="$(prep download "$1" --dest "$dl")" || die "download failed"
  fi
  [[ -d "$RAW" ]] || die "--raw $RAW is not a directory"
  RAW="$(abs_path "$RAW")"
}

make_stamp() {
  local details="" f
  details+="script $PROG"$'\n'
  while [[ $# -gt 0 && "$1" != "--" ]]; do details+="$1"$'\n'; shift; done
  [[ $# -gt 0 ]] && shift
  for f in "$@"; do details+="input $(basename "$f") $(_sha256 < "$f")"$'\n'; done
  details+="code $(cat "$REPO_DIR/scripts/_common.sh" "$REPO_DIR/scripts/_prepare_common.sh" "$0" "$PREP_PY" | _sha256)"$'\n'
  details+="sentencepiece $("$PY" -c 'import sentencepiece; print(sentencepiece.__version__)')"$'\n'
  STAMP="sha256 $(printf '%s' "$details" | _sha256)"$'\n'"$details"
}

_cleanup() {
  if [[ -n "$WORK" && -d "$WORK" ]]; then rm -rf "$WORK"; fi
}

# begin_output: OUT (absolute) and STAMP must be set. Exits 0 if OUT is already up to date.
begin_output() {
  [[ "$OUT" != "/" ]] || die "--out must not be /"
  if [[ -e "$OUT" ]]; then
    if [[ -f "$OUT/prepare.stamp" ]]; then
      if [[ "$(head -n 1 "$OUT/prepare.stamp")" == "$(head -n 1 <<<"$STAMP")" ]]; then
        log "$OUT is up to date (same inputs, options and code): nothing to do"
        exit 0
      fi
      log "$OUT was prepared from other inputs or options: rebuilding it"
    else
      die "$OUT exists and has no prepare.stamp from these scripts: not overwriting it (remove it or choose another --out)"
    fi
  fi
  local parent
  parent="$(dirname "$OUT")"
  mkdir -p "$parent"
  WORK="$(mktemp -d "$parent/.$(basename "$OUT").tmp.XXXXXX")"
  trap _cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir "$WORK/out" "$WORK/text"
}

# run_preprocess ARGS...: fairseq-preprocess inside WORK/text (relative paths, so that the
# preprocess.log it writes is the same on every run) with --destdir WORK/out.
run_preprocess() {
  log "binarizing with fairseq-preprocess"
  (cd "$WORK/text" && "$PY" -m fairseq_cli.preprocess "$@" --destdir ../out --workers "$WORKERS") \
    || die "fairseq-preprocess failed"
  # Its log starts with the full argument Namespace, which includes --workers: drop that line so
  # the output does not depend on the number of workers (the statistics lines stay).
  if [[ -f "$WORK/out/preprocess.log" ]]; then
    grep -v '^Namespace(' "$WORK/out/preprocess.log" > "$WORK/preprocess.log" || true
    mv "$WORK/preprocess.log" "$WORK/out/preprocess.log"
  fi
}

finish_output() {
  printf '%s' "$STAMP" > "$WORK/out/prepare.stamp"
  if [[ -e "$OUT" ]]; then mv "$OUT" "$WORK/old"; fi
  mv "$WORK/out" "$OUT"
  log "wrote $OUT"
}

default_workers() {
  local n
  n="$(nproc 2>/dev/null || echo 1)"
  (( n > 8 )) && n=8
  echo "$n"
}
