# Helpers shared by scripts/prepare_{xsum,wikitext,squad}.sh (sourced, not run).
#
# The calling script sets PROG and defines usage(). The flow is:
#   parse options -> resolve_raw (download when there is no --raw) -> make_stamp (hash of the
#   inputs, options and this code) -> begin_output (no-op exit if OUT already holds that stamp;
#   else a staging dir WORK next to OUT) -> the data set's own steps write WORK/out and WORK/text
#   -> run_preprocess -> finish_output (stamp, then mv WORK/out to OUT).
# Nothing is written into OUT until the final mv; WORK is removed on any exit (and, after a
# SIGKILL, by the next run for the same OUT). Files in an earlier OUT that these scripts did not
# write are kept.

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
      log "$OUT was prepared from other inputs or options: rebuilding it (replacing only the files these scripts wrote there)"
    else
      die "$OUT exists and has no prepare.stamp from these scripts: not overwriting it (remove it or choose another --out)"
    fi
  fi
  local parent
  parent="$(dirname "$OUT")"
  mkdir -p "$parent"
  _remove_stale_staging "$parent" "$(basename "$OUT")"
  WORK="$(mktemp -d "$parent/.$(basename "$OUT").tmp.XXXXXX")"
  trap _cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  echo "$$ $(_host)" > "$WORK/owner"
  mkdir "$WORK/out" "$WORK/text"
}

_host() { printf '%s' "${HOSTNAME:-$(uname -n)}"; }

# _pid_alive PID: true if a process PID exists on this host (also one of another user)
_pid_alive() {
  kill -0 "$1" 2>/dev/null || [[ -d "/proc/$1" ]] && return 0
  if [[ ! -d /proc/self ]] && command -v ps >/dev/null 2>&1; then ps -p "$1" >/dev/null 2>&1; return; fi
  return 1
}

# _remove_stale_staging PARENT NAME: remove PARENT/.NAME.tmp.* left by runs that were killed
# (SIGKILL skips the EXIT trap): their owner file names a process of this host that is gone;
# one without an owner file (an older version of these scripts) once it is a minute old.
_remove_stale_staging() {
  local d pid host
  for d in "$1/.$2.tmp."*; do
    [[ -d "$d" ]] || continue
    if [[ -f "$d/owner" ]]; then
      read -r pid host < "$d/owner" || true
      [[ "$host" == "$(_host)" && "$pid" =~ ^[0-9]+$ ]] || continue
      ! _pid_alive "$pid" || continue
    else
      [[ -n "$(find "$d" -maxdepth 0 -mmin +1 2>/dev/null)" ]] || continue
    fi
    log "removing $d (staging directory of an earlier run of $2 that was killed)"
    rm -rf "$d"
  done
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

# Every name an earlier version of these scripts may have written into OUT (its prepare.stamp
# has no "output NAME" lines): used only to tell the user's own files from ours in such an OUT.
_LEGACY_OUTPUT_RE='^((train|valid|test)(\.src-tgt\.(src|tgt))?\.(bin|idx)|dict(\.(src|tgt))?\.txt|spm\.(model|vocab)|(train|valid|test)\.id|(valid|test)\.tgt\.raw|dev\.answers\.jsonl|preprocess\.log|prepare\.stamp)$'

# _keep_foreign_files NEW_NAMES: hard-link (else copy) every entry of the existing OUT that these
# scripts did not write into WORK/out, so that it survives the swap below. The originals stay in
# OUT until the swap, so nothing is lost if the run is killed now. A user's file with the name of
# a new output file stops the run, with OUT unchanged.
_keep_foreign_files() {
  local new="$1" old="" legacy=1 path name kept=()
  if grep -q '^output ' "$OUT/prepare.stamp"; then
    old="$(sed -n 's/^output //p' "$OUT/prepare.stamp")"
    legacy=0
  fi
  for path in "$OUT"/* "$OUT"/.[!.]* "$OUT"/..?*; do
    [[ -e "$path" || -L "$path" ]] || continue
    name="${path##*/}"
    [[ "$name" != prepare.stamp ]] || continue
    grep -qxF -- "$name" <<< "$old" && continue
    if (( legacy )); then
      grep -qxF -- "$name" <<< "$new" && continue
      [[ "$name" =~ $_LEGACY_OUTPUT_RE ]] && continue
    elif grep -qxF -- "$name" <<< "$new"; then
      die "$OUT/$name was not written by $PROG, but the new output has a file of that name: move it out of $OUT, then run again ($OUT is unchanged)"
    fi
    cp -al "$path" "$WORK/out/$name" 2>/dev/null || cp -a "$path" "$WORK/out/$name" \
      || die "cannot keep $path in the new $OUT ($OUT is unchanged)"
    kept+=("$name")
  done
  (( ${#kept[@]} == 0 )) || log "keeping what $PROG did not write in $OUT: ${kept[*]}"
}

# finish_output: the stamp (hash, details, then one "output NAME" line per file written), then
# WORK/out replaces OUT; files in OUT that these scripts did not write are carried over.
finish_output() {
  local names
  names="$(cd "$WORK/out" && LC_ALL=C ls -A | LC_ALL=C sort)"
  { printf '%s' "$STAMP"; sed 's/^/output /' <<< "$names"; } > "$WORK/out/prepare.stamp"
  if [[ -e "$OUT" ]]; then
    _keep_foreign_files "$names"
    mv "$OUT" "$WORK/old"
  fi
  mv "$WORK/out" "$OUT"
  log "wrote $OUT"
}

default_workers() {
  local n
  n="$(nproc 2>/dev/null || echo 1)"
  (( n > 8 )) && n=8
  echo "$n"
}
