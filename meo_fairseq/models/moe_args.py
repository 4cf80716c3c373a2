"""The ``--moe-*`` options shared by every model, and their translation into layer configs."""

import logging
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr

from ..modules.config import BALANCE_LOSSES, IMPLS, LEVELS, MODES, UNITS, MoEConfig

logger = logging.getLogger(__name__)

DECODER_ROUTINGS = ("encoder", "segment", "prefix", "full")


@dataclass
class MoEArgs(FairseqDataclass):
    moe_mode: ChoiceEnum(MODES) = field(
        default="meo", metadata={"help": "dense FFN, vanilla top-k MoE, or MEO (Merging Experts into One)"}
    )
    moe_level: ChoiceEnum(LEVELS) = field(
        default="sequence",
        metadata={
            "help": "moe: per-token or per-sequence routing; meo: `token` is the paper's token-level "
            "MEO (sequence merge plus the per-token attention block)"
        },
    )
    moe_experts: int = field(default=16, metadata={"help": "experts per expert layer"})
    moe_top_k: int = field(default=4, metadata={"help": "selected experts"})
    moe_freq: int = field(
        default=1, metadata={"help": "every F-th layer (F-1, 2F-1, ...) gets experts, the others stay dense"}
    )
    moe_expert_unit: ChoiceEnum(UNITS) = field(
        default="linear",
        metadata={
            "help": "`linear`: fc1 and fc2 each have their own router (the authors' code); "
            "`ffn`: one router for both"
        },
    )
    moe_decoder_routing: Optional[ChoiceEnum(DECODER_ROUTINGS)] = field(
        default=None,
        metadata={
            "help": "causal routing of decoder layers: encoder (mean of the encoder output; default for "
            "encoder-decoder models), segment (gate of segment j from segment j-1; default for language "
            "models), prefix (positions after the first P route on their mean), full (the authors' "
            "whole-sequence mean: leaks future tokens)"
        },
    )
    moe_segment_length: int = field(default=64, metadata={"help": "segment length L for segment routing"})
    moe_prefix_length: int = field(default=64, metadata={"help": "prefix length P for prefix routing"})
    no_moe_gate_noise: Optional[bool] = field(
        default=None,
        metadata={
            "help": "no gate noise in training (the default: the noise stalls training, see "
            "docs/quality.md); --moe-gate-noise turns on the authors' noisy top-k gating"
        },
    )
    moe_gate_noise_scale: float = field(
        default=1.0,
        metadata={
            "help": "with --moe-gate-noise: multiply the noise std softplus(x W_noise) + 0.01 (0.70 at "
            "the start) by this factor"
        },
    )
    moe_balance_loss: ChoiceEnum(BALANCE_LOSSES) = field(
        default="cv",
        metadata={"help": "auxiliary load-balancing loss: CV^2(importance)+CV^2(load), Switch, or none"},
    )
    moe_balance_weight: float = field(default=0.01, metadata={"help": "weight of the balance loss"})
    moe_z_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the router z-loss (ST-MoE uses 1e-3)"}
    )
    moe_compressed_experts: int = field(
        default=0, metadata={"help": "n_ce: how many of the top-k selected experts run as compressed experts"}
    )
    moe_merge_min_tokens: Optional[float] = field(
        default=None,
        metadata={
            "help": "MEO with linear experts: merge when a routing group has at least this many tokens, "
            "else run the selected experts and mix (the same function). Default: a cost model"
        },
    )
    moe_impl: ChoiceEnum(IMPLS) = field(
        default="auto",
        metadata={
            "help": "implementation of the expert layers (the same function): "
            "reference (plain autograd, no host "
            "syncs, compiles whole: the GPU path), blocked (CPU-tuned kernels), auto (reference when CUDA is "
            "available, else blocked)"
        },
    )
    moe_compile: bool = field(
        default=False,
        metadata={
            "help": "compile each expert FFN's training forward with torch.compile (the layers take the "
            "reference path inside; incremental decoding stays eager)"
        },
    )
    moe_token_block_order: ChoiceEnum(("auto", "route-first", "block-first")) = field(
        default="auto",
        metadata={
            "help": "token-level MEO: route-first (route on x, the token block before the matmul: "
            "the authors' GPT-2 layer) or block-first (the block first, route on the mean of "
            "x + block(x): their BERT/BART/T5 layer); auto: block-first for encoder-decoder models, "
            "route-first for language models"
        },
    )
    moe_compressed_weighting: ChoiceEnum(("auto", "authors", "renormalised")) = field(
        default="auto",
        metadata={
            "help": "compressed experts: the main experts keep their softmax-over-all-N probabilities "
            "(authors, as the Compressed Experts code) or are renormalised to sum to 1 (renormalised, "
            "keeps upcycling exact); auto: renormalised with --moe-upcycle-from, else authors"
        },
    )
    moe_upcycle_from: Optional[str] = field(
        default=None,
        metadata={"help": "initialise from a checkpoint of the matching dense fairseq model (upcycling)"},
    )


def add_gate_noise_alias(parser):
    """``--moe-gate-noise`` (the authors' noisy gating) beside the dataclass's ``--no-moe-gate-noise``
    (the default). Both set ``no_moe_gate_noise``: True, False, or None (not given: no noise)."""
    try:
        parser.add_argument(
            "--moe-gate-noise",
            dest="no_moe_gate_noise",
            action="store_false",
            help="noisy top-k gating in training (the authors' code; default: off)",
        )
    except Exception:  # already added (argparse conflict)
        pass


def _get(args, name, default=None):
    value = safe_getattr(args, name, default)
    return default if value is None else value


def gate_noise(args) -> bool:
    """Noisy gating only with --moe-gate-noise (no_moe_gate_noise False). Checkpoints written before
    the default changed store False for their (noisy) default, and keep it."""
    return safe_getattr(args, "no_moe_gate_noise", None) is False


def _token_block_order(args, is_lm: bool) -> str:
    """--moe-token-block-order: the authors' order for each kind of model by default."""
    order = str(_get(args, "moe_token_block_order", "auto"))
    if order == "auto":
        return "route_first" if is_lm else "block_first"
    if order not in ("route-first", "block-first", "route_first", "block_first"):
        raise ValueError(
            f"--moe-token-block-order: unknown value {order!r}; choose auto, route-first or block-first"
        )
    return order.replace("-", "_")


def _compressed_weighting(args) -> str:
    """--moe-compressed-weighting: the authors' by default, renormalised when upcycling (exact start)."""
    weighting = str(_get(args, "moe_compressed_weighting", "auto"))
    if weighting == "auto":
        return "renormalised" if safe_getattr(args, "moe_upcycle_from", None) else "authors"
    return weighting


def layer_configs(args, side: str, num_layers: int, is_lm: bool = False) -> List[MoEConfig]:
    """One MoEConfig per layer of ``side`` ('encoder' or 'decoder').

    Raises ValueError naming the flag for a bad combination.
    """
    mode = str(_get(args, "moe_mode", "meo"))
    level = str(_get(args, "moe_level", "sequence"))
    freq = int(_get(args, "moe_freq", 1))
    if freq < 1:
        raise ValueError(f"--moe-freq: must be >= 1, got {freq}")
    routing_flag = safe_getattr(args, "moe_decoder_routing", None)
    if routing_flag is not None:
        routing_flag = str(routing_flag)
    if routing_flag is not None and routing_flag not in DECODER_ROUTINGS:
        raise ValueError(
            f"--moe-decoder-routing: unknown value {routing_flag!r}; "
            f"choose one of {', '.join(DECODER_ROUTINGS)}"
        )
    if is_lm and routing_flag == "encoder":
        raise ValueError(
            "--moe-decoder-routing encoder: a language model has no encoder; use segment, prefix or full"
        )
    if mode == "moe" and level == "token":
        routing = "token"
    elif side == "encoder":
        routing = "sequence"
    else:
        routing = routing_flag or ("segment" if is_lm else "encoder")
    base = MoEConfig(
        mode=mode,
        level=level,
        experts=int(_get(args, "moe_experts", 16)),
        top_k=int(_get(args, "moe_top_k", 4)),
        expert_unit=str(_get(args, "moe_expert_unit", "linear")),
        routing=routing,
        segment_length=int(_get(args, "moe_segment_length", 64)),
        prefix_length=int(_get(args, "moe_prefix_length", 64)),
        gate_noise=gate_noise(args),
        gate_noise_scale=float(_get(args, "moe_gate_noise_scale", 1.0)),
        balance_loss=str(_get(args, "moe_balance_loss", "cv")),
        balance_weight=float(_get(args, "moe_balance_weight", 0.01)),
        z_loss_weight=float(_get(args, "moe_z_loss_weight", 0.0)),
        compressed_experts=int(_get(args, "moe_compressed_experts", 0)),
        merge_min_tokens=safe_getattr(args, "moe_merge_min_tokens", None),
        impl=str(_get(args, "moe_impl", "auto")),
        token_block_order=_token_block_order(args, is_lm),
        compressed_weighting=_compressed_weighting(args),
        compile=bool(_get(args, "moe_compile", False)),
    )
    if mode != "dense" and 0 < num_layers < freq:
        raise ValueError(
            f"--moe-freq {freq}: the {side} has {num_layers} layers, so none of them would get experts "
            f"(layers {freq - 1}, {2 * freq - 1}, ... do); use --moe-freq {num_layers} or less, "
            "or --moe-mode dense for a dense model"
        )
    dense = base.with_(mode="dense")
    return [base if (i + 1) % freq == 0 else dense for i in range(num_layers)]


def warn_harmful_settings(args) -> None:
    """Warn, when a model is built for training, about option pairs that the quality study
    (docs/quality.md) found to hurt. They stay allowed: an ablation may want them."""
    mode, loss = str(_get(args, "moe_mode", "meo")), str(_get(args, "moe_balance_loss", "cv"))
    if mode == "meo" and loss == "switch":
        logger.warning(
            "--moe-balance-loss switch with --moe-mode meo: the Switch loss is made for top-1 token "
            "routing; in docs/quality.md (section 2(iv), 3 seeds) it put MEO 33.8 perplexity points "
            "behind dense, against 12.1 with cv (the default, the authors' loss) in the same setting"
        )
