"""Hypotheses from ``fairseq-generate`` output, ordered by sample id, sentencepiece decoded.

fairseq-generate prints, per sample, lines such as ``S-<id>``, ``T-<id>``, ``H-<id>\\t<score>\\t<text>``,
``D-<id>\\t<score>\\t<text>`` and ``P-<id>``, in the order the batches finish (not in id order). The id
is the sample's index in the binarized split, i.e. its line number (0-based) in the split's ``.id``
file written by scripts/prepare_*.sh. With ``--nbest K`` there are K ``H`` lines per id, best first;
the first one is kept.

Decoding: without ``--post-process sentencepiece`` the ``H`` text is sentencepiece pieces
(``▁The ▁cat s``); it is decoded the way fairseq's own ``sentencepiece`` post-processing does
(remove spaces, then ``▁`` -> space). ``decode="auto"`` decodes only text that contains ``▁``, so
already post-processed output passes through unchanged.

Command line::

    python -m meo_fairseq.scoring.fairseq_output gen.out --out hyp.txt [--ids test.id | --num N]

writes one hypothesis per line, line i = sample id i.
"""

import argparse
import re
import sys
from typing import Dict, Iterable, List, Optional, Union

from ._io import read_lines

SPM_SPACE = "\u2581"
_LINE = re.compile(r"^(?P<kind>[A-Z])-(?P<id>\d+)\t(?P<rest>.*)$")


def decode_sentencepiece(text: str) -> str:
    """Sentencepiece pieces (space separated) -> text, as fairseq's ``sentencepiece`` post-process."""
    return text.replace(" ", "").replace(SPM_SPACE, " ").strip()


def parse_generate_output(lines: Iterable[str], kind: str = "H") -> Dict[int, str]:
    """id -> text of the first ``<kind>-<id>`` line per id (``H``: hypothesis, ``D``: detokenized).

    ``H``/``D`` lines are ``<kind>-<id>\\t<score>\\t<text>``; the text may be empty.
    """
    out: Dict[int, str] = {}
    for line in lines:
        line = line.rstrip("\r\n")
        m = _LINE.match(line)
        if not m or m.group("kind") != kind:
            continue
        sample_id = int(m.group("id"))
        if sample_id in out:
            continue  # --nbest: keep the best (first) hypothesis
        fields = m.group("rest").split("\t", 1)
        out[sample_id] = fields[1] if len(fields) > 1 else ""
    return out


def read_hypotheses(
    source: Union[str, Iterable[str]],
    num: Optional[int] = None,
    kind: str = "H",
    decode: str = "auto",
    allow_missing: bool = False,
) -> List[str]:
    """Hypotheses of a fairseq-generate output (a path or lines) as a list indexed by sample id.

    ``num``: the number of samples in the split (ids must be ``0..num-1``; default: largest id + 1).
    A missing id is an error unless ``allow_missing`` (then its hypothesis is ``""``).
    ``decode``: ``"auto"`` (decode sentencepiece when the text has ``▁``), ``"spm"`` or ``"none"``.
    """
    if decode not in ("auto", "spm", "none"):
        raise ValueError(f"decode must be auto, spm or none, not {decode!r}")
    lines = read_lines(source) if isinstance(source, str) else source
    by_id = parse_generate_output(lines, kind)
    if num is None:
        num = max(by_id) + 1 if by_id else 0
    too_big = sorted(i for i in by_id if i >= num)
    if too_big:
        raise ValueError(f"sample ids {too_big[:5]} are not below the number of samples {num}")
    missing = [i for i in range(num) if i not in by_id]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} of {num} samples have no {kind}- line, e.g. ids {missing[:5]}")
    hyps = []
    for i in range(num):
        text = by_id.get(i, "")
        if decode == "spm" or (decode == "auto" and SPM_SPACE in text):
            text = decode_sentencepiece(text)
        hyps.append(text)
    return hyps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.scoring.fairseq_output",
        description="fairseq-generate output -> one decoded hypothesis per line, in sample-id order.",
    )
    p.add_argument("generate_output", help="stdout of fairseq-generate")
    p.add_argument("--out", required=True, help="hypotheses file to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ids", help="the split's .id file: its line count is the number of samples")
    group.add_argument("--num", type=int, help="number of samples in the split")
    p.add_argument("--kind", default="H", choices=["H", "D"], help="which lines to read (default H)")
    p.add_argument("--decode", default="auto", choices=["auto", "spm", "none"])
    p.add_argument(
        "--allow-missing", action="store_true", help="write an empty line for a sample without hypothesis"
    )
    args = p.parse_args(argv)
    try:
        num = len(read_lines(args.ids)) if args.ids else args.num
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        hyps = read_hypotheses(args.generate_output, num, args.kind, args.decode, args.allow_missing)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        msg = str(e)
        print(
            f"error: {msg if msg.startswith(args.generate_output) else f'{args.generate_output}: {msg}'}",
            file=sys.stderr,
        )
        return 2
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for h in hyps:
            f.write(h.replace("\n", " ") + "\n")
    print(f"wrote {len(hyps)} hypotheses to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
