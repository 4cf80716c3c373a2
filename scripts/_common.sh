# Helpers shared by every script in scripts/ (sourced, not run). The caller sets PROG.

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
  PY="$REPO_DIR/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python || echo python3)"
fi

die() { echo "$PROG: error: $*" >&2; exit 2; }
log() { echo "[$PROG] $*" >&2; }

need_value() {  # need_value OPTION "$#" ["$2"]: an option that takes a value must have one
  [[ "$2" -ge 2 && -n "${3-x}" ]] || die "option $1 needs a value (see --help)"
}

check_int() {  # check_int NAME VALUE MIN
  [[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= $3 )) || die "$1 must be an integer >= $3, got '$2'"
}

abs_path() {  # absolute path without trailing slashes (the path need not exist)
  local p="$1"
  [[ "$p" == /* ]] || p="$PWD/$p"
  while [[ "$p" == */ && "$p" != / ]]; do p="${p%/}"; done
  printf '%s\n' "$p"
}
