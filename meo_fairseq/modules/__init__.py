"""The layer library: pure PyTorch, usable without fairseq. The math lives in reference.py."""

from . import reference
from .config import MoEConfig
from .dispatch import dispatch, mix_linear
from .experts import StackedExperts, TokenBlock
from .layer import ExpertLinear, MoEFFN, reorder_state, set_impl
from .losses import cv_loss, cv_squared, switch_loss, z_loss
from .merge import apply_merged, merge_weights, merged_linear
from .router import Router, Routing, masked_mean

__all__ = [
    "MoEConfig",
    "dispatch",
    "mix_linear",
    "StackedExperts",
    "TokenBlock",
    "ExpertLinear",
    "MoEFFN",
    "reorder_state",
    "cv_loss",
    "cv_squared",
    "switch_loss",
    "z_loss",
    "apply_merged",
    "merge_weights",
    "merged_linear",
    "Router",
    "Routing",
    "masked_mean",
    "reference",
    "set_impl",
]
