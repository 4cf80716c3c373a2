"""Initialisation options of the expert layers (``--moe-router-init``, ``--moe-expert-init-scale``).

Applied by parameter name after a model is built (and after ``--moe-upcycle-from`` has copied the
dense weights), so that they work for every model of the plugin:

* ``--moe-router-init auto`` (default): ``normal`` with ``--moe-upcycle-from``, else ``zero``
  (docs/quality.md: without gate noise a zero router keeps an upcycled model dense forever, while
  from scratch a random router helped token MoE and hurt MEO).
* ``--moe-router-init zero`` (the authors' code): ``...router.w_gate`` and ``...router.w_noise``
  are zero, so every expert starts with the same logit.
* ``--moe-router-init normal``: ``w_gate`` ~ N(0, std^2) with ``--moe-router-init-std`` (as sparse
  upcycling initialises its router); ``w_noise`` stays zero. An upcycled layer still computes the
  dense function at the start (its experts are copies and the gates sum to 1), but tokens are
  routed to different experts from the first update, so the copies can diverge even without gate
  noise.
* ``--moe-expert-init-scale s``: multiply the randomly initialised ``...experts.weight`` of every
  expert layer with more than one expert by ``s`` (models trained from scratch only; an upcycled
  model keeps the dense weights). The gate-weighted sum of k independent random experts has about
  1/sqrt(k) of one expert's scale; ``s = sqrt(k)`` compensates. Not given (the default): sqrt(k)
  from scratch, k the fully computed experts (``--moe-top-k`` less ``--moe-compressed-experts``),
  and 1 when upcycling (docs/quality.md: sqrt(k) halved MEO's gap to dense from scratch). ``1``:
  the experts' own initialisation, as the authors.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

from .common import attach_metadata
from .moe_args import warn_harmful_settings
from .upcycle import loading_trained_checkpoint, upcycle_from_checkpoint

logger = logging.getLogger(__name__)

ROUTER_INITS = ("auto", "zero", "normal")


@dataclass
class MoEInitArgs(FairseqDataclass):
    moe_router_init: ChoiceEnum(ROUTER_INITS) = field(
        default="auto",
        metadata={
            "help": "router weights at the start: zero (the authors' code), normal (N(0, std^2), as "
            "sparse upcycling), or auto: normal with --moe-upcycle-from (without gate noise a zero "
            "router keeps upcycled copies identical), else zero"
        },
    )
    moe_router_init_std: float = field(default=0.1, metadata={"help": "std of --moe-router-init normal"})
    moe_expert_init_scale: Optional[float] = field(
        default=None,
        metadata={
            "help": "multiply the random expert weights by this factor (from scratch only; not with "
            "--moe-upcycle-from). Default: sqrt(k) from scratch (a merge or mix of k random experts "
            "has 1/sqrt(k) of one expert's scale), 1 when upcycling; 1: the authors"
        },
    )


def _get(args, name, default):
    value = safe_getattr(args, name, default)
    return default if value is None else value


def apply_init(model: torch.nn.Module, args) -> None:
    """Apply the ``--moe-router-init*`` and ``--moe-expert-init-scale`` options to ``model`` in place.

    Args:
        model: a built model of the plugin (after any upcycling).
        args: the model's arguments (a Namespace or a config with the fields of :class:`MoEInitArgs`).

    Does nothing while fairseq builds a model to load a trained checkpoint into.
    Raises ValueError naming the flag for a bad value.
    """
    if loading_trained_checkpoint():
        return
    init = resolved_init(args)
    router_init, std, scale = init["router_init"], init["router_init_std"], init["expert_init_scale"]
    n_router = n_expert = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if router_init == "normal" and name.endswith("router.w_gate"):
                p.normal_(0.0, std)
                n_router += 1
            elif scale != 1.0 and name.endswith("experts.weight") and p.dim() == 3 and p.size(0) > 1:
                p.mul_(scale)
                n_expert += 1
    if router_init == "normal":
        logger.info("--moe-router-init normal: %d routers ~ N(0, %g^2)", n_router, std)
    if scale != 1.0:
        logger.info("--moe-expert-init-scale %g: scaled %d expert weights", scale, n_expert)


def resolved_init(args) -> dict:
    """The initialisation options as a model built from ``args`` applies them, defaults resolved:
    {"router_init": "zero" or "normal", "router_init_std", "expert_init_scale"}.
    Raises ValueError naming the flag for a bad value."""
    router_init = str(_get(args, "moe_router_init", "auto"))
    std = float(_get(args, "moe_router_init_std", 0.1))
    given = safe_getattr(args, "moe_expert_init_scale", None)
    upcycled = bool(safe_getattr(args, "moe_upcycle_from", None))
    scale = default_expert_init_scale(args, upcycled) if given is None else float(given)
    if router_init not in ROUTER_INITS:
        raise ValueError(
            f"--moe-router-init: unknown value {router_init!r}; choose one of {', '.join(ROUTER_INITS)}"
        )
    if std < 0:
        raise ValueError(f"--moe-router-init-std: must be >= 0, got {std}")
    if scale <= 0:
        raise ValueError(f"--moe-expert-init-scale: must be > 0, got {scale}")
    if scale != 1.0 and upcycled:
        raise ValueError(
            "--moe-expert-init-scale applies to models trained from scratch, not with --moe-upcycle-from"
        )
    if router_init == "auto":
        router_init = "normal" if upcycled else "zero"
    return {"router_init": router_init, "router_init_std": std, "expert_init_scale": scale}


def default_expert_init_scale(args, upcycled: bool) -> float:
    """The ``--moe-expert-init-scale`` of a model trained from scratch that does not set it: the
    factor that gives the gate-weighted merge (MEO) or mix (MoE) of k random experts, each with
    gate 1/k at the start, one expert's scale: sqrt(k) per linear, and k ** (1/4) per linear for
    vanilla MoE over whole-FFN experts (their two linears compound); 1 when upcycling."""
    if upcycled:
        return 1.0
    k = max(1, int(_get(args, "moe_top_k", 4)) - int(_get(args, "moe_compressed_experts", 0)))
    whole_ffn = (
        str(_get(args, "moe_mode", "meo")) == "moe" and str(_get(args, "moe_expert_unit", "linear")) == "ffn"
    )
    return k**0.25 if whole_ffn else math.sqrt(k)


def finish_build(model: torch.nn.Module, args, task, upgrade=None, **metadata) -> torch.nn.Module:
    """The end of every plugin model's ``build_model``, in this order: warn about option pairs known
    to hurt (warn_harmful_settings) and copy the dense checkpoint of ``--moe-upcycle-from`` (both
    not when fairseq builds a model to load a trained checkpoint into; ``upgrade``: see
    upcycle_from_checkpoint), apply the ``--moe-router-init`` / ``--moe-expert-init-scale``
    options, and record the dictionaries and expert options (``metadata``: attach_metadata's
    keyword arguments). Returns ``model``."""
    path = safe_getattr(args, "moe_upcycle_from", None)
    if not loading_trained_checkpoint():
        warn_harmful_settings(args)
        if path:
            upcycle_from_checkpoint(model, path, upgrade=upgrade)
    apply_init(model, args)
    attach_metadata(model, args, task, **metadata)
    return model
