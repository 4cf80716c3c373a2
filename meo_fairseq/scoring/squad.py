"""SQuAD v1.1 exact match and F1, as defined by the official evaluation script (evaluate-v1.1.py).

Answers are normalised by lowercasing, removing punctuation (``string.punctuation``), removing the
articles "a", "an", "the" and collapsing whitespace. Exact match is equality of the normalised
strings; F1 is the harmonic mean of precision and recall of the normalised tokens (bag of words).
Each prediction is scored against every reference answer and the maximum is kept. Totals are
percentages over all reference questions (a question without a prediction scores 0), as in the
official script.

Command line::

    python -m meo_fairseq.scoring.squad --hyp hyp.txt --ids test.id --ref dev.answers.jsonl \\
        [--out scores.json]

``--hyp`` has one predicted answer per line, in the order of the ids in ``--ids``; without ``--ids``,
``--hyp`` is an official-style predictions JSON file ``{"question id": "answer", ...}``. ``--ref`` is
``dev.answers.jsonl`` from scripts/prepare_squad.sh (``{"id", "answers"}`` per line) or a SQuAD v1.1
JSON file (``dev-v1.1.json``).
"""

import argparse
import json
import re
import string
import sys
from collections import Counter
from typing import Callable, Dict, List, Mapping, Sequence

from ._io import read_lines, read_text, report

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles (a/an/the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token-level F1 of the normalised prediction against one normalised reference (0..1)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_references(
    metric: Callable[[str, str], float], prediction: str, references: Sequence[str]
) -> float:
    if not references:
        raise ValueError("no reference answers")
    return max(metric(prediction, ref) for ref in references)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Dict[str, float]:
    """Exact match and F1 (percent) over all questions of ``references`` (id -> answers).

    ``predictions`` maps question ids to predicted answers; a question without a prediction scores
    0 (counted in ``num_unanswered``); a prediction for an unknown id is an error.
    """
    unknown = [qid for qid in predictions if qid not in references]
    if unknown:
        raise ValueError(f"{len(unknown)} predictions for ids not in the references, e.g. {unknown[:3]}")
    if not references:
        raise ValueError("no reference questions")
    em = f1 = 0.0
    unanswered = 0
    for qid, answers in references.items():
        if qid not in predictions:
            unanswered += 1
            continue
        em += max_over_references(exact_match_score, predictions[qid], answers)
        f1 += max_over_references(f1_score, predictions[qid], answers)
    n = len(references)
    return {
        "exact_match": 100.0 * em / n,
        "f1": 100.0 * f1 / n,
        "num_questions": n,
        "num_unanswered": unanswered,
    }


def load_references(path: str) -> Dict[str, List[str]]:
    """id -> reference answers, from ``dev.answers.jsonl`` or a SQuAD v1.1 JSON file."""
    text = read_text(path, "utf-8-sig")
    refs: Dict[str, List[str]] = {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None  # JSON lines
    if isinstance(doc, dict) and "data" in doc:
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    refs[str(qa["id"])] = [a["text"] for a in qa["answers"]]
        return refs
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            qid, answers = str(obj["id"]), obj["answers"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'id' and 'answers' ({e})")
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{path}:{lineno}: 'answers' must be a non-empty list")
        refs[qid] = [str(a) for a in answers]
    return refs


def load_predictions(hyp_path: str, ids_path: str = None) -> Dict[str, str]:
    """id -> predicted answer: from parallel ``hyp``/``ids`` text files, or a predictions JSON file."""
    if ids_path is None:
        try:
            preds = json.loads(read_text(hyp_path))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{hyp_path}: not a JSON predictions file ({e}); give --ids for a text file"
            ) from None
        if not isinstance(preds, dict):
            raise ValueError(f"{hyp_path}: without --ids, --hyp must be a JSON object id -> answer")
        return {str(k): str(v) for k, v in preds.items()}
    hyps, ids = read_lines(hyp_path), read_lines(ids_path)
    if len(hyps) != len(ids):
        raise ValueError(f"{hyp_path} has {len(hyps)} lines but {ids_path} has {len(ids)}")
    preds: Dict[str, str] = {}
    for qid, hyp in zip(ids, hyps):
        if qid in preds:
            raise ValueError(f"{ids_path}: duplicate id {qid!r}")
        preds[qid] = hyp
    return preds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.scoring.squad", description="SQuAD v1.1 exact match and F1 (percent)."
    )
    p.add_argument(
        "--hyp", required=True, help="predicted answers, one per line (or a predictions JSON without --ids)"
    )
    p.add_argument("--ids", help="question ids, one per line, in the order of --hyp (e.g. test.id)")
    p.add_argument("--ref", required=True, help="dev.answers.jsonl or dev-v1.1.json")
    p.add_argument("--out", help="write the scores to this JSON file")
    args = p.parse_args(argv)
    try:
        scores = squad_scores(load_predictions(args.hyp, args.ids), load_references(args.ref))
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if scores["num_unanswered"]:
        print(
            f"warning: {scores['num_unanswered']} questions have no prediction and score 0", file=sys.stderr
        )
    return report(scores, args.out)


if __name__ == "__main__":
    sys.exit(main())
