"""Evaluation scorers: ROUGE (summarization), SQuAD v1.1 exact match / F1, fairseq-generate parsing.

Importable without torch or fairseq. Submodules are loaded lazily (so ``python -m
meo_fairseq.scoring.rouge`` runs without a double-import warning):

* :func:`rouge_scores` (:mod:`.rouge`): ROUGE-1/2/L F-measure, percentages.
* :func:`squad_scores`, :func:`exact_match_score`, :func:`f1_score`, :func:`normalize_answer`
  (:mod:`.squad`): the official SQuAD v1.1 metrics.
* :func:`read_hypotheses`, :func:`parse_generate_output`, :func:`decode_sentencepiece`
  (:mod:`.fairseq_output`): hypotheses from fairseq-generate output, ordered by sample id.
"""

_EXPORTS = {
    "rouge_scores": "rouge",
    "squad_scores": "squad",
    "exact_match_score": "squad",
    "f1_score": "squad",
    "normalize_answer": "squad",
    "read_hypotheses": "fairseq_output",
    "parse_generate_output": "fairseq_output",
    "decode_sentencepiece": "fairseq_output",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
