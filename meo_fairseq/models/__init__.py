"""Registered models: ``meo_transformer`` (encoder-decoder) and ``meo_transformer_lm``."""

from . import meo_transformer, meo_transformer_lm  # noqa: F401
