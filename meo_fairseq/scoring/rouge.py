"""ROUGE-1/2/L F-measure for summarization, computed with Google's ``rouge-score`` package.

Scores are F-measures averaged over examples and reported as percentages (0-100), as in the
summarization literature. Tokenization is rouge-score's default (lowercase, non-alphanumeric
characters become spaces) with the Porter stemmer (``use_stemmer=True``). ROUGE-L is the
sentence-level LCS variant (``rougeL``); XSum references are single sentences.

Command line::

    python -m meo_fairseq.scoring.rouge --hyp hyp.txt --ref test.tgt.raw [--out scores.json]

(one hypothesis / reference per line, same order) prints the scores as JSON and writes them to --out.
"""

import argparse
import sys
from typing import Dict, Sequence

from ._io import read_lines, report

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(
    hypotheses: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> Dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (percent) of ``hypotheses`` against ``references`` (pairwise).

    Returns ``{"rouge1": ..., "rouge2": ..., "rougeL": ..., "num_examples": n}``.
    """
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # score(target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = len(hypotheses)
    result: Dict[str, float] = {key: 100.0 * totals[key] / n for key in ROUGE_TYPES}
    result["num_examples"] = n
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.scoring.rouge",
        description="ROUGE-1/2/L F-measure (percent), rouge-score with stemming.",
    )
    p.add_argument("--hyp", required=True, help="hypotheses, one per line")
    p.add_argument("--ref", required=True, help="references, one per line, same order")
    p.add_argument("--out", help="write the scores to this JSON file")
    p.add_argument("--no-stemmer", action="store_true", help="score without the Porter stemmer")
    args = p.parse_args(argv)
    try:
        hyps, refs = read_lines(args.hyp), read_lines(args.ref)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        scores = rouge_scores(hyps, refs, use_stemmer=not args.no_stemmer)
    except ValueError as e:
        print(f"error: {args.hyp} vs {args.ref}: {e}", file=sys.stderr)
        return 2
    return report(scores, args.out)


if __name__ == "__main__":
    sys.exit(main())
