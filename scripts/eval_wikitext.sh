#!/usr/bin/env bash
# Perplexity of a trained language model on WikiText (fairseq-eval-lm). See --help.
set -euo pipefail
PROG=eval_wikitext.sh
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"

usage() {
  cat <<EOF2
Usage: scripts/eval_wikitext.sh --data DIR --checkpoint PATH --out DIR [--subset test|valid]
                                [--tokens-per-sample N] [--context-window N] [--batch-size 2]
                                [fairseq-eval-lm options...]

fairseq-eval-lm (with --user-dir meo_fairseq) on the --subset split of --data. The text is cut
into blocks of --tokens-per-sample tokens (default: the value the checkpoint was trained with).
--context-window N (default 0) scores every block with up to N tokens of the preceding text as
extra context (fairseq's sliding-window evaluation: lower, fairer perplexity, slower); with 0 the
blocks are scored independently, as the paper's (Hugging Face run_clm) evaluation does.
Prints the result and writes OUT/ppl.json: perplexity (per token of the dictionary, <unk> and the
line-end token </s> included), loss_base2, num_tokens, and the settings.

  --data DIR         output of scripts/prepare_wikitext.sh
  --checkpoint PATH  e.g. SAVE_DIR/checkpoint_best.pt of scripts/train_wikitext.sh
  --out DIR          output directory (ppl.json, eval.log)
  anything else      passed to fairseq-eval-lm (e.g. --fp16 on a GPU, --max-tokens 4096, --cpu)
Environment: PYTHON (default: .venv/bin/python of this checkout).
EOF2
}

SUBSET=test TPS="" CONTEXT=0 BATCH=2
declare -A EVAL_OPTS=([--tokens-per-sample]=TPS [--context-window]=CONTEXT [--batch-size]=BATCH)
parse_eval_args "$@"
[[ -z "$TPS" ]] || check_int --tokens-per-sample "$TPS" 1
check_int --context-window "$CONTEXT" 0
check_int --batch-size "$BATCH" 1
check_data_dir "$DATA" dict.txt "$SUBSET.idx" "$SUBSET.bin"
check_checkpoint "$CKPT"
DATA="$(abs_path "$DATA")" CKPT="$(abs_path "$CKPT")" OUT="$(abs_path "$OUT")"

ckpt_info "$CKPT" "$DATA/dict.txt" "$DATA/dict.txt"
if [[ -n "$CKPT_TASK" && "$CKPT_TASK" != language_modeling ]]; then
  die "--checkpoint $CKPT: trained for task '$CKPT_TASK', not language_modeling (use the matching eval_*.sh)"
fi
TPS="${TPS:-${CKPT_TOKENS_PER_SAMPLE:-512}}"
if (( CONTEXT >= TPS )); then
  die "--context-window $CONTEXT must be smaller than --tokens-per-sample $TPS"
fi
if [[ -n "$CKPT_MAX_TGT" ]] && (( TPS > CKPT_MAX_TGT )); then
  die "--tokens-per-sample $TPS is longer than the model's $CKPT_MAX_TGT positions"
fi

args=("$DATA" --user-dir "$USER_DIR" --path "$CKPT" --task language_modeling --gen-subset "$SUBSET"
      --tokens-per-sample "$TPS" --context-window "$CONTEXT" --batch-size "$BATCH"
      "${EXTRA[@]+"${EXTRA[@]}"}")
# fairseq-eval-lm itself, run through a small driver that keeps its result (the CLI only logs it)
print_cmd "$PY" -m fairseq_cli.eval_lm "${args[@]}"
mkdir -p "$OUT"
# (set +e: under pipefail a failure would end the script here, before its message below)
set +e
"$PY" - "$OUT/ppl.json" "$CKPT" "$SUBSET" "$TPS" "$CONTEXT" "${args[@]}" <<'PYEOF' 2>&1 | tee "$OUT/eval.log"
import json
import logging
import math
import os
import re
import sys

from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import eval_lm

out_path, ckpt, subset, tps, context = sys.argv[1:6]
argv = sys.argv[6:]


class TokenCount(logging.Handler):
    """Keeps the token count from eval_lm's 'Evaluated N tokens' log line."""

    count = None

    def emit(self, record):
        m = re.match(r"Evaluated ([\d,]+) tokens", record.getMessage())
        if m:
            TokenCount.count = int(m.group(1).replace(",", ""))


logging.getLogger("fairseq_cli.eval_lm").addHandler(TokenCount())
parser = options.get_eval_lm_parser()
args = options.parse_args_and_arch(parser, argv)
results = eval_lm.main(convert_namespace_to_omegaconf(args))
loss2 = float(results["loss"])
scores = {
    "perplexity": float(results["perplexity"]),
    "loss_base2": loss2,
    "loss": loss2 * math.log(2),
    "num_tokens": TokenCount.count,
    "subset": subset,
    "tokens_per_sample": int(tps),
    "context_window": int(context),
    "checkpoint": ckpt,
}
if not math.isfinite(scores["perplexity"]) or not TokenCount.count:
    print(f"error: no valid perplexity ({scores})", file=sys.stderr)
    sys.exit(2)
tmp = out_path + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(scores, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, out_path)
print(json.dumps(scores, indent=2, sort_keys=True))
PYEOF
status=${PIPESTATUS[0]}
set -e
(( status == 0 )) || die "fairseq-eval-lm failed: $(explain_failure "$OUT/eval.log") (full output: $OUT/eval.log)"
log "wrote $OUT/ppl.json"
