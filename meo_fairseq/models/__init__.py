"""Registered models: ``meo_transformer`` (encoder-decoder), ``meo_transformer_lm``, ``meo_roberta``."""

from . import meo_roberta, meo_transformer, meo_transformer_lm  # noqa: F401
