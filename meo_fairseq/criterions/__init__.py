"""Registered criteria: ``moe_cross_entropy`` and ``moe_label_smoothed_cross_entropy``."""

from . import moe_cross_entropy, moe_label_smoothed_cross_entropy, moe_masked_lm, moe_sentence_prediction  # noqa: F401  # noqa: F401
