"""Registered criteria: ``moe_cross_entropy``, ``moe_label_smoothed_cross_entropy``,
``moe_masked_lm`` and ``moe_sentence_prediction`` (fairseq's losses plus the experts' auxiliary
losses)."""

from . import (  # noqa: F401
    moe_cross_entropy,
    moe_label_smoothed_cross_entropy,
    moe_masked_lm,
    moe_sentence_prediction,
)
