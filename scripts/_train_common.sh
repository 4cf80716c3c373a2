# Helpers shared by scripts/train_{xsum,wikitext,squad}.sh and scripts/eval_{xsum,wikitext,squad}.sh
# (sourced, not run).
#
# Train scripts: the caller sets PROG, DEFAULT_ARCH and defines usage() and recipe_args() (which
# fills the array RECIPE with the recipe's fairseq-train options; it may look at ARCH and EXTRA),
# then calls `parse_train_args "$@"` and `run_train`. The final command is
#   [launcher] python -m fairseq_cli.train DATA --user-dir meo_fairseq --save-dir DIR --arch A
#              RECIPE... [--moe-upcycle-from CKPT] DEVICE... EXTRA...
# (python -m meo_fairseq.train instead of fairseq_cli.train for --bf16: see run_train)
# so every option in EXTRA (anything the script does not know itself) comes last and overrides the
# recipe (argparse keeps the last value of a repeated option).

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
USER_DIR="$REPO_DIR/meo_fairseq"
# the devices paragraph of every train script's --help (how run_train picks devices)
DEVICES_HELP='Devices: with GPUs visible (CUDA_VISIBLE_DEVICES), fairseq trains on all of them
(--distributed-world-size = their number; fairseq spawns one process per GPU) with --fp16
(MEO_BF16=1: --bf16, run by python -m meo_fairseq.train since fairseq-train takes --bf16 for
--tpu). MEO_LAUNCHER=torchrun launches with torchrun instead (MEO_TORCHRUN_ARGS
replaces "--standalone --nproc_per_node N", e.g. for several nodes). Without a GPU: --cpu.'
# the scorers are run as `python -m meo_fairseq.scoring...`: make the checkout importable
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"


# print_cmd ARGS...: the command, shell-quoted, so that it can be copied and re-run
# (STDOUT_TO=FILE print_cmd ...: with "> FILE" appended)
print_cmd() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  out="${out% }"
  [[ -z "${STDOUT_TO:-}" ]] || out+=" > $(printf '%q' "$STDOUT_TO")"
  echo "[$PROG] command: $out" >&2
}

# has_opt OPTION...: true if EXTRA contains one of the options (as `--opt` or `--opt=value`)
has_opt() {
  local a o
  for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    for o in "$@"; do
      [[ "$a" == "$o" || "$a" == "$o="* ]] && return 0
    done
  done
  return 1
}

# opt_value OPTION: the last value EXTRA gives to OPTION (empty if none)
opt_value() {
  local i v="" n=${#EXTRA[@]}
  for (( i = 0; i < n; i++ )); do
    case "${EXTRA[$i]}" in
      "$1") (( i + 1 < n )) && v="${EXTRA[$((i + 1))]}" ;;
      "$1="*) v="${EXTRA[$i]#"$1="}" ;;
    esac
  done
  printf '%s' "$v"
}

# check_data_dir DIR FILE...: DIR must exist and hold every FILE
check_data_dir() {
  local dir="$1" f
  shift
  [[ -n "$dir" ]] || die "--data DIR is required (see --help)"
  [[ -d "$dir" ]] || die "--data $dir: no such directory"
  for f in "$@"; do
    [[ -e "$dir/$f" ]] || die "--data $dir: missing $f (prepare the data with the matching scripts/prepare_*.sh)"
  done
}

# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

# detect_devices: sets NGPU (visible CUDA devices; MEO_NUM_GPUS overrides the detection) and BF16_OK
detect_devices() {
  local info
  if [[ -n "${MEO_NUM_GPUS:-}" ]]; then
    check_int MEO_NUM_GPUS "$MEO_NUM_GPUS" 0
    NGPU="$MEO_NUM_GPUS"
    BF16_OK="${MEO_BF16_SUPPORTED:-1}"
    return
  fi
  info="$("$PY" -c 'import torch
n = torch.cuda.device_count()
print(n, int(n > 0 and torch.cuda.is_bf16_supported()))' 2>/dev/null)" || info="0 0"
  NGPU="${info%% *}"
  BF16_OK="${info##* }"
}

# device_args: fills DEVICE with --cpu, or with the precision and distributed options for NGPU GPUs,
# and LAUNCH with the launcher prefix (empty: fairseq itself spawns one process per GPU).
#   MEO_BF16=1            --bf16 instead of --fp16 (where the GPU supports bfloat16)
#   MEO_LAUNCHER=torchrun launch with torchrun (python -m torch.distributed.run) instead of
#                         fairseq's own spawning; MEO_TORCHRUN_ARGS replaces its default options
#                         "--standalone --nproc_per_node NGPU" (e.g. for several nodes)
#   MEO_NUM_GPUS=N        use N as the number of GPUs instead of detecting it
device_args() {
  DEVICE=()
  LAUNCH=()
  if has_opt --cpu; then
    NGPU=0
    log "--cpu given: training on the CPU"
    return
  fi
  detect_devices
  if (( NGPU == 0 )); then
    log "no GPU visible: training on the CPU (--cpu); that is for smoke tests, not for the full recipe"
    DEVICE=(--cpu)
    return
  fi
  if ! has_opt --fp16 --bf16 --amp --memory-efficient-fp16 --memory-efficient-bf16; then
    if [[ "${MEO_BF16:-0}" == 1 && "$BF16_OK" == 1 ]]; then
      DEVICE+=(--bf16)
    else
      [[ "${MEO_BF16:-0}" != 1 ]] || log "MEO_BF16=1 but the GPU does not support bfloat16: using --fp16"
      DEVICE+=(--fp16)
    fi
  fi
  local world="$NGPU"
  case "${MEO_LAUNCHER:-fairseq}" in
    fairseq) ;;
    torchrun)
      # asked for, torchrun launches even one GPU (one process in a process group of one)
      local targs
      read -r -a targs <<< "${MEO_TORCHRUN_ARGS:---standalone --nproc_per_node $NGPU}"
      LAUNCH=("$PY" -m torch.distributed.run "${targs[@]}")
      # fairseq reads torchrun's environment only when --distributed-world-size > 1, and then
      # replaces the value by WORLD_SIZE: any value > 1 is right, across nodes too
      (( world > 1 )) || world=2
      ;;
    *) die "MEO_LAUNCHER must be fairseq or torchrun, got '${MEO_LAUNCHER}'" ;;
  esac
  has_opt --distributed-world-size || DEVICE+=(--distributed-world-size "$world")
  log "$NGPU GPU(s) visible: ${DEVICE[*]}${LAUNCH[*]:+ (launcher: torchrun)}"
}

# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

DATA="" SAVE_DIR="" ARCH="" UPCYCLE="" DRY_RUN=0
EXTRA=()

parse_train_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --data) need_value "$1" "$#" "${2-}"; DATA="$2"; shift 2 ;;
      --data=*) DATA="${1#--data=}"; shift ;;
      --save-dir) need_value "$1" "$#" "${2-}"; SAVE_DIR="$2"; shift 2 ;;
      --save-dir=*) SAVE_DIR="${1#--save-dir=}"; shift ;;
      --arch) need_value "$1" "$#" "${2-}"; ARCH="$2"; shift 2 ;;
      --arch=*) ARCH="${1#--arch=}"; shift ;;
      --upcycle-from|--moe-upcycle-from) need_value "$1" "$#" "${2-}"; UPCYCLE="$2"; shift 2 ;;
      --upcycle-from=*|--moe-upcycle-from=*) UPCYCLE="${1#*=}"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) EXTRA+=("$1"); shift ;;
    esac
  done
  [[ -n "$DATA" ]] || { usage >&2; die "--data DIR is required"; }
  [[ -n "$SAVE_DIR" ]] || { usage >&2; die "--save-dir DIR is required"; }
  ARCH="${ARCH:-$DEFAULT_ARCH}"
  DATA="$(abs_path "$DATA")"
  SAVE_DIR="$(abs_path "$SAVE_DIR")"
  if [[ -n "$UPCYCLE" ]]; then
    [[ -f "$UPCYCLE" ]] || die "--upcycle-from $UPCYCLE: no such checkpoint file"
    UPCYCLE="$(abs_path "$UPCYCLE")"
  fi
}

run_train() {
  RECIPE=()
  recipe_args
  device_args
  local cmd=("${LAUNCH[@]+"${LAUNCH[@]}"}")
  (( ${#cmd[@]} )) || cmd=("$PY")
  # fairseq-train's parser turns --bf16 into --tpu (fairseq issue #4696): bfloat16 training runs
  # through meo_fairseq.train, fairseq-train with --tpu left to mean what it says
  local module=fairseq_cli.train a
  for a in "${DEVICE[@]+"${DEVICE[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}"; do
    [[ "$a" != --bf16 && "$a" != --memory-efficient-bf16 ]] || module=meo_fairseq.train
  done
  ! has_opt --tpu || module=fairseq_cli.train
  cmd+=(-m "$module" "$DATA" --user-dir "$USER_DIR" --save-dir "$SAVE_DIR" --arch "$ARCH"
        "${RECIPE[@]}")
  [[ -z "$UPCYCLE" ]] || cmd+=(--moe-upcycle-from "$UPCYCLE")
  cmd+=("${DEVICE[@]+"${DEVICE[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")
  print_cmd "${cmd[@]}"
  if (( DRY_RUN )); then
    return 0
  fi
  mkdir -p "$SAVE_DIR"
  lock_save_dir
  exec "${cmd[@]}"
}

# lock_save_dir: one training run per --save-dir (two would interleave their checkpoints). With
# flock(1) the lock is an flock on SAVE_DIR/.train.lock through file descriptor 9, which the
# training process inherits across exec: the kernel releases it when that process ends, even by
# SIGKILL. Without flock (e.g. macOS) the file names the holder's pid, and a lock whose process is
# gone (same host) is stale and taken over. The file says who holds it, for the message.
lock_save_dir() {
  local lock="$SAVE_DIR/.train.lock" holder pid host
  local me
  me="pid $$ on ${HOSTNAME:-$(uname -n)}, started $(date -u +%Y-%m-%dT%H:%M:%SZ) by $PROG"
  if command -v flock >/dev/null 2>&1; then
    exec 9>>"$lock" || die "cannot create the lock file $lock"
    if ! flock -n 9; then
      holder="$(head -n 1 "$lock" 2>/dev/null)"
      die "another training run holds --save-dir $SAVE_DIR (${holder:-holder unknown}; lock $lock): wait for it to end or stop it, or choose another --save-dir"
    fi
    printf '%s\n' "$me" > "$lock"
    return 0
  fi
  if [[ -s "$lock" ]]; then
    read -r _ pid _ host _ < "$lock" || true
    if [[ "$host" == "${HOSTNAME:-$(uname -n)}," && "$pid" =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null \
       && ! ps -p "$pid" >/dev/null 2>&1; then
      log "removing the stale lock $lock ($(head -n 1 "$lock"): that process is gone)"
      rm -f "$lock"
    fi
  fi
  if ! ( set -o noclobber; printf '%s\n' "$me" > "$lock" ) 2>/dev/null; then
    die "another training run holds --save-dir $SAVE_DIR ($(head -n 1 "$lock" 2>/dev/null); lock $lock): wait for it to end or stop it, or choose another --save-dir (remove $lock if that run is gone)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

# check_checkpoint PATH: the --checkpoint file must exist
# parse_eval_args "$@": the options of the eval scripts. --data, --checkpoint (--path), --out,
# --subset (--gen-subset) and -h are common; EVAL_OPTS maps each script's own value options to
# the variables they set (e.g. EVAL_OPTS=([--beam]=BEAM)). Anything else goes to EXTRA.
parse_eval_args() {
  DATA="" CKPT="" OUT="" EXTRA=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --data) need_value "$1" "$#" "${2-}"; DATA="$2"; shift 2 ;;
      --checkpoint|--path) need_value "$1" "$#" "${2-}"; CKPT="$2"; shift 2 ;;
      --out) need_value "$1" "$#" "${2-}"; OUT="$2"; shift 2 ;;
      --subset|--gen-subset) need_value "$1" "$#" "${2-}"; SUBSET="$2"; shift 2 ;;
      *)
        if [[ -n "${EVAL_OPTS[$1]+x}" ]]; then
          need_value "$1" "$#" "${2-}"; printf -v "${EVAL_OPTS[$1]}" '%s' "$2"; shift 2
        else
          EXTRA+=("$1"); shift
        fi ;;
    esac
  done
  [[ -n "$DATA" ]] || { usage >&2; die "--data DIR is required"; }
  [[ -n "$CKPT" ]] || { usage >&2; die "--checkpoint PATH is required"; }
  [[ -n "$OUT" ]] || { usage >&2; die "--out DIR is required"; }
}

check_checkpoint() {
  [[ -n "$1" ]] || die "--checkpoint PATH is required (see --help)"
  [[ -f "$1" ]] || die "--checkpoint $1: no such file"
}

# ckpt_info PATH [SOURCE_DICT TARGET_DICT]: sets CKPT_MAX_SRC, CKPT_MAX_TGT,
# CKPT_TOKENS_PER_SAMPLE and CKPT_TASK from the configuration stored in a fairseq checkpoint
# (empty where the checkpoint has no such value). With the data's dictionary files: dies, naming
# both files, when they are not the dictionaries the checkpoint was trained with (a wrong score
# otherwise; see meo_fairseq.models.common.check_data_dictionaries).
# The file is memory-mapped, so even a large checkpoint is not read into memory for this.
ckpt_info() {
  local out
  out="$("$PY" - "$@" <<'PYEOF'
import sys

import torch

path = sys.argv[1]
try:
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
except Exception:  # not a zip-format file: no mmap
    state = torch.load(path, map_location="cpu", weights_only=False)
cfg = state.get("cfg")


def get(section, key):
    if cfg is not None:
        node = cfg.get(section) if hasattr(cfg, "get") else None
        if node is not None:
            value = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
            if value is not None:
                return value
    args = state.get("args")
    return getattr(args, key, None) if args is not None else None


task = get("task", "_name") or get("model", "task")
print(f"CKPT_TASK={task or ''}")
if len(sys.argv) > 3 and isinstance(state.get("model"), dict):
    from meo_fairseq.models.common import CheckpointMismatchError, check_data_dictionaries

    try:
        check_data_dictionaries(state["model"], path, sys.argv[2], sys.argv[3])
    except CheckpointMismatchError as e:
        print(f"CKPT_ERROR={e}")
for name, section, key in (
    ("CKPT_MAX_SRC", "model", "max_source_positions"),
    ("CKPT_MAX_TGT", "model", "max_target_positions"),
    ("CKPT_TOKENS_PER_SAMPLE", "task", "tokens_per_sample"),
):
    value = get(section, key)
    print(f"{name}={int(value) if value is not None else ''}")
PYEOF
)" || die "--checkpoint $1: cannot read it as a fairseq checkpoint (see the error above)"
  CKPT_TASK="" CKPT_MAX_SRC="" CKPT_MAX_TGT="" CKPT_TOKENS_PER_SAMPLE=""
  local line
  while IFS= read -r line; do
    case "$line" in
      CKPT_TASK=*) CKPT_TASK="${line#*=}" ;;
      CKPT_MAX_SRC=*) CKPT_MAX_SRC="${line#*=}" ;;
      CKPT_MAX_TGT=*) CKPT_MAX_TGT="${line#*=}" ;;
      CKPT_TOKENS_PER_SAMPLE=*) CKPT_TOKENS_PER_SAMPLE="${line#*=}" ;;
      CKPT_ERROR=*) die "${line#*=}. Evaluate on data binarized with the checkpoint's dictionary (fairseq-preprocess --srcdict)" ;;
    esac
  done <<< "$out"
}

# explain_failure LOG: one line on why a fairseq command failed, from its output in LOG
explain_failure() {
  local line sizes
  line="$(grep -E 'CheckpointMismatchError: ' "$1" | tail -n 1)"
  if [[ -n "$line" ]]; then
    printf '%s\n' "${line#*CheckpointMismatchError: }"
    return
  fi
  sizes="$(grep -oE 'size mismatch for [A-Za-z_.]*embed_tokens\.weight: copying a param with shape torch\.Size\(\[[0-9]+' "$1" | head -n 1)"
  if [[ -n "$sizes" ]]; then
    printf '%s\n' "the checkpoint's dictionary has ${sizes##*[} symbols, not the size of the data's dictionary: evaluate on data binarized with the checkpoint's dictionary"
    return
  fi
  line="$(grep -E '^[A-Za-z_.]*(Error|Exception): |(^|: )error: ' "$1" | tail -n 1)"
  printf '%s\n' "${line:-no error message (see the output above)}"
}

# run_generate DATA CKPT OUT SUBSET BPE GEN_ARGS...: fairseq-generate (task translation, src -> tgt)
# into OUT/generate-SUBSET.txt, then OUT/hyp.txt: one decoded hypothesis per line, in the order of
# DATA/SUBSET.id. BPE: spm (H lines, sentencepiece pieces decoded) or gpt2 (fairseq's --bpe gpt2,
# the detokenized D lines).
run_generate() {
  local data="$1" ckpt="$2" out="$3" subset="$4" bpe="$5"
  shift 5
  ckpt_info "$ckpt" "$data/dict.src.txt" "$data/dict.tgt.txt"
  if [[ -n "$CKPT_TASK" && "$CKPT_TASK" != translation ]]; then
    die "--checkpoint $ckpt: trained for task '$CKPT_TASK', not translation (use the matching train_*.sh)"
  fi
  local pos=()
  [[ -z "$CKPT_MAX_SRC" ]] || pos+=(--max-source-positions "$CKPT_MAX_SRC")
  [[ -z "$CKPT_MAX_TGT" ]] || pos+=(--max-target-positions "$CKPT_MAX_TGT")
  local bpe_args=() kind=H decode=spm
  if [[ "$bpe" == gpt2 ]]; then
    bpe_args=(--bpe gpt2)
    kind=D
    decode=none
  fi
  local gen_out="$out/generate-$subset.txt"
  local cmd=("$PY" -m fairseq_cli.generate "$data" --user-dir "$USER_DIR" --path "$ckpt"
             --task translation --source-lang src --target-lang tgt --gen-subset "$subset"
             --truncate-source "${pos[@]+"${pos[@]}"}" --required-batch-size-multiple 1
             "${bpe_args[@]+"${bpe_args[@]}"}" "$@")
  STDOUT_TO="$gen_out" print_cmd "${cmd[@]}"
  mkdir -p "$out"
  local err_log="$out/generate-$subset.err" status
  # stdout (hypotheses, logs) to gen_out; stderr shown and kept for the message below
  set +e
  "${cmd[@]}" 2>&1 > "$gen_out" | tee "$err_log" >&2
  status=${PIPESTATUS[0]}
  set -e
  (( status == 0 )) || die "fairseq-generate failed: $(explain_failure "$err_log") (output so far: $gen_out, errors: $err_log)"
  cmd=("$PY" -m meo_fairseq.scoring.fairseq_output "$gen_out" --out "$out/hyp.txt"
       --ids "$data/$subset.id" --kind "$kind" --decode "$decode")
  print_cmd "${cmd[@]}"
  "${cmd[@]}" || die "reading the hypotheses from $gen_out failed"
}
