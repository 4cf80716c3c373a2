"""Settings of one expert layer, validated in one place.

Error messages name the command-line flag (``--moe-top-k``) that a fairseq user sets, so that a
bad combination fails at model build with a message that points at the flag.
"""

import math
import warnings
from dataclasses import dataclass, replace
from typing import Optional

MODES = ("dense", "moe", "meo")
LEVELS = ("token", "sequence")
UNITS = ("linear", "ffn")
# How the gate of a position is computed (see router.py):
#   token     every token on its own
#   sequence  masked mean over the real tokens of the sequence (non-causal: encoders)
#   encoder   a context vector given by the caller (decoder of an encoder-decoder)
#   segment   gate of segment j from the masked mean of segment j-1; segment 0: learned default
#   prefix    positions >= P from the mean of the first P; positions < P: learned default
#   full      masked mean over the whole sequence in a decoder (the authors' code; leaks)
ROUTINGS = ("token", "sequence", "encoder", "segment", "prefix", "full")
CAUSAL_ROUTINGS = ("token", "encoder", "segment", "prefix")
BALANCE_LOSSES = ("cv", "switch", "none")
# Implementations of the expert layers (see docs/layer-library.md):
#   reference  reference.py: plain autograd, no host syncs, compiles whole (the GPU path)
#   blocked    merge.py / dispatch.py / gating.py: custom autograd functions tuned for the CPU
#   auto       reference when CUDA is available at build time, else blocked
IMPLS = ("auto", "reference", "blocked")
# Token-level MEO: where the per-token block sits (both orders are the authors'):
#   route_first  route on x, apply the block just before the matmul (their GPT-2 layer)
#   block_first  apply the block first, route on the mean of x + block(x) (their encoder layer:
#                BERT, BART, T5)
TOKEN_BLOCK_ORDERS = ("route_first", "block_first")
# Compressed experts: the main experts' gates are
#   renormalised  a softmax over the main experts' own logits (they sum to 1: upcycling is exact)
#   authors       their softmax-over-all-N probabilities (the compressed experts' mass is dropped)
COMPRESSED_WEIGHTINGS = ("renormalised", "authors")


def resolve_impl(impl: str) -> str:
    """The implementation a layer built now uses for ``impl`` (``auto`` looks for CUDA once)."""
    if impl == "auto":
        import torch

        return "reference" if torch.cuda.is_available() else "blocked"
    return impl


def unused_options(mode: Optional[str], level: Optional[str], compressed_experts: int) -> set:
    """The MoEConfig fields that mean nothing for a layer of this mode, level and number of
    compressed experts (whatever their value, it computes the same): ``token_block_order``
    without a token block (token-level MEO only), ``compressed_weighting`` without compressed
    experts. Checkpoint metadata and the quality study leave them out of their comparisons."""
    unused = set()
    if (mode or "meo") != "meo" or level != "token":
        unused.add("token_block_order")
    if not compressed_experts:
        unused.add("compressed_weighting")
    return unused


def _flag(name: str) -> str:
    """The fairseq command-line flag that sets a field (routing is the decoder's flag)."""
    if name == "routing":
        return "--moe-decoder-routing"
    return "--moe-" + name.replace("_", "-")


@dataclass(frozen=True)
class MoEConfig:
    mode: str = "meo"
    """dense FFN, vanilla top-k MoE, or MEO (merge the selected experts, then one matmul)"""
    level: str = "sequence"
    """moe: per-token or per-sequence routing; meo: `token` adds the token attention block"""
    experts: int = 16
    top_k: int = 4
    expert_unit: str = "linear"
    """`linear`: each linear has its own router; `ffn`: fc1 and fc2 share one router"""
    routing: str = "sequence"
    """granularity of the gate for sequence-level layers (see ROUTINGS)"""
    segment_length: Optional[int] = None
    prefix_length: Optional[int] = None
    gate_noise: bool = False
    """noisy top-k gating in training (the authors' default: True). Off by default: the noise
    stalls training (docs/quality.md)"""
    gate_noise_scale: float = 1.0
    """multiplies the noise std softplus(x W_noise) + 0.01 (the authors: 1; at W_noise = 0 the std
    is 0.70 times this)"""
    balance_loss: str = "cv"
    balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    compressed_experts: int = 0
    merge_min_tokens: Optional[float] = None
    """MEO path choice: merge when a routing group has at least this many tokens, otherwise
    run the selected experts and mix (same function for linear experts). None: cost model."""
    impl: str = "auto"
    """implementation: auto, reference or blocked (see IMPLS); a layer resolves it once, at build"""
    token_block_order: str = "route_first"
    """token-level MEO: route_first or block_first (see TOKEN_BLOCK_ORDERS)"""
    compressed_weighting: str = "renormalised"
    """compressed experts: renormalised or authors (see COMPRESSED_WEIGHTINGS)"""
    compile: bool = False
    """fairseq layers compile the expert FFN's training forward with torch.compile (--moe-compile)"""

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"{_flag(name)}: {msg}")

        for name, allowed in (
            ("mode", MODES),
            ("level", LEVELS),
            ("expert_unit", UNITS),
            ("routing", ROUTINGS),
            ("balance_loss", BALANCE_LOSSES),
            ("impl", IMPLS),
            ("token_block_order", TOKEN_BLOCK_ORDERS),
            ("compressed_weighting", COMPRESSED_WEIGHTINGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                bad(name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
        if self.mode == "dense":
            return
        if self.experts < 1:
            bad("experts", f"must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            bad("top_k", f"must be between 1 and --moe-experts ({self.experts}), got {self.top_k}")
        if not 0 <= self.compressed_experts < self.top_k:
            bad(
                "compressed_experts",
                f"must be >= 0 and < --moe-top-k ({self.top_k}), got {self.compressed_experts}",
            )
        if self.routing == "segment" and not (self.segment_length or 0) >= 1:
            bad("segment_length", "segment routing needs a positive --moe-segment-length")
        if self.routing == "prefix" and not (self.prefix_length or 0) >= 1:
            bad("prefix_length", "prefix routing needs a positive --moe-prefix-length")
        if not (math.isfinite(self.gate_noise_scale) and self.gate_noise_scale > 0):
            bad("gate_noise_scale", f"must be a finite number > 0, got {self.gate_noise_scale}")
        for name in ("balance_weight", "z_loss_weight", "merge_min_tokens"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                bad(name, f"must be a finite number >= 0, got {value}")
        if self.mode == "meo" and self.routing == "token":
            bad("level", "MEO merges per routing group; per-token routing is `--moe-mode moe`")
        if self.mode == "moe" and self.level == "token" and self.routing != "token":
            bad("level", "token-level MoE routes every token (routing must be `token`)")
        if self.routing == "full":
            warnings.warn(
                "--moe-decoder-routing full routes every position on the mean of the whole "
                "sequence, future tokens included (the authors' behaviour): a language model "
                "trained this way sees the future through its gates.",
                stacklevel=3,
            )

    @property
    def token_block(self) -> bool:
        """Token-level MEO: sequence merge plus the per-token bottleneck residual block."""
        return self.mode == "meo" and self.level == "token"

    @property
    def full_experts(self) -> int:
        return self.top_k - self.compressed_experts

    def with_(self, **kw) -> "MoEConfig":
        return replace(self, **kw)
