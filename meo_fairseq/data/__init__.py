"""Data preparation helpers for the XSum, SQuAD v1.1 and WikiText pipelines.

Importable without torch or fairseq. The functions live in :mod:`meo_fairseq.data.prepare`
(which ``scripts/prepare_*.sh`` run as a file); they are re-exported here lazily, so that
``python -m meo_fairseq.data.prepare`` works without a double-import warning.
"""

_EXPORTS = (
    "DataError",
    "normalize_whitespace",
    "iter_text_lines",
    "check_text_file",
    "read_jsonl",
    "read_squad",
    "train_sentencepiece",
    "load_sentencepiece",
    "write_fairseq_dict",
    "encode_pieces",
    "choose_window",
    "squad_source_pieces",
    "squad_input_text",
    "prepare_xsum",
    "prepare_squad",
    "prepare_wikitext_raw",
)

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
