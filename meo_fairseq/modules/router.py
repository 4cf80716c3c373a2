"""Noisy top-k router with token, sequence and causal routing granularities.

The router turns a layer input ``x`` [B, T, d] (plus a padding mask and, for ``encoder`` routing,
a context vector) into a :class:`Routing`: gates for *runs* of consecutive positions that share
one gate (a sequence, a segment, the part after a prefix), or for every token.

Everything is computed in fp32 whatever the input dtype. The auxiliary loss of the last forward
is exposed as ``router.aux_loss`` (already weighted) and routing statistics as ``router.stats``
(from ``router.summary``, a vector that :func:`summarize` turns into statistics for many routers
at once).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .config import MoEConfig, resolve_impl


@dataclass
class Routing:
    """Gates of one call, for S runs of consecutive positions that share a gate.

    gates: (B, S, N) fp32 gates of the fully computed experts (zeros elsewhere); they sum to 1.
    topk_idx, topk_gates: (B, S, kf) the same as expert indices and gates (for compute-then-mix).
    compressed: (B, S, N) renormalised gates of the compressed experts, or None.
    bounds: S+1 positions along T delimiting the runs; None for token routing (S == T).
    version: for incremental decoding, changes whenever the gates change (cache key).
    """

    gates: Tensor
    topk_idx: Tensor
    topk_gates: Tensor
    compressed: Optional[Tensor]
    bounds: Optional[List[int]]
    version: int = -1

    # the former names
    idx = property(lambda self: self.topk_idx)
    w = property(lambda self: self.topk_gates)
    ce = property(lambda self: self.compressed)

    def run(self, s: int) -> "Routing":
        """The routing of run ``s`` alone (bounds relative to that run)."""
        a, b = self.bounds[s], self.bounds[s + 1]
        pick = slice(s, s + 1)
        comp = self.compressed[:, pick] if self.compressed is not None else None
        return Routing(
            self.gates[:, pick],
            self.topk_idx[:, pick],
            self.topk_gates[:, pick],
            comp,
            [0, b - a],
            self.version,
        )

    def flat(self) -> reference.Gates:
        """The gates of the G = B * S groups, run-minor: gates (G, N), topk_idx/topk_gates (G, kf),
        compressed (G, N) or None."""
        b, s, n = self.gates.shape
        comp = self.compressed.reshape(b * s, n) if self.compressed is not None else None
        k = self.topk_idx.size(-1)
        return reference.Gates(
            self.gates.reshape(b * s, n),
            self.topk_idx.reshape(b * s, k),
            self.topk_gates.reshape(b * s, k),
            comp,
        )


def _mean_weights(pad_mask: Tensor) -> Tensor:
    """Per-position weights [B, T] of the masked mean: 1 / (real tokens) at real positions."""
    keep = (~pad_mask).float()
    return keep / keep.sum(1, keepdim=True).clamp(min=1.0)


def _weighted_sum(x: Tensor, w: Optional[Tensor]) -> Tensor:
    """fp32 [B, d]: the mean over T of x [B, T, d] (w None), else sum_t w[b, t] x[b, t] as one
    [1, T] x [T, d] product per sequence (no [B, T, d] temporary for fp32 x; a half-precision x is
    first copied to fp32)."""
    if w is None:
        return torch.mean(x, 1, dtype=torch.float32)
    return torch.bmm(w.unsqueeze(1), x.float()).squeeze(1)


class _MaskedMean(torch.autograd.Function):
    """The masked mean with a backward that writes no more than it must. Without padding every
    position's gradient is the same row, returned as an expanded view: autograd adds it into the
    input's other gradient in one pass (mean's own backward first writes a [B, T, d] quotient,
    25 MB for the fc2 router of a 16 x 128-token BERT-base FFN). With padding it is one broadcast
    product (the per-sequence product's own backward is a batched outer product)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Optional[Tensor]):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.save_for_backward(w)
        return _weighted_sum(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        (w,) = ctx.saved_tensors
        b, t, d = ctx.shape
        if w is None:
            return (g / t).to(ctx.dtype).unsqueeze(1).expand(b, t, d), None
        return (w.unsqueeze(2) * g.unsqueeze(1)).to(ctx.dtype), None


def masked_mean(x: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
    """Mean over T of x [B, T, d] ignoring pad positions (pad_mask [B, T], True = pad); fp32 [B, d].

    A sequence with no real token gives zeros.
    """
    if torch.compiler.is_compiling():
        return reference.pool(x, pad_mask)
    w = _mean_weights(pad_mask) if pad_mask is not None else None
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedMean.apply(x, w)
    return _weighted_sum(x, w)


class Router(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017) with a learned default gate for causal modes.

    Parameters (zero-initialised, as the authors' code: an upcycled layer starts at the dense
    function): ``w_gate`` [d, N], ``w_noise`` [d, N], ``default_logits`` [N].
    """

    # training-time gating as one autograd node (gating.py); False: the step-by-step reference
    fused = True

    def __init__(self, input_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.experts
        self.w_gate = nn.Parameter(torch.zeros(input_dim, cfg.experts))
        self.w_noise = nn.Parameter(torch.zeros(input_dim, cfg.experts))
        self.default_logits = nn.Parameter(torch.zeros(cfg.experts))
        self.aux_loss: Optional[Tensor] = None
        self.summary: Optional[Tensor] = None  # [N + 2]: importance, balance, z-loss
        # reference.py's gating (no host syncs, compiles whole) instead of gating.py's fused node
        self.reference = resolve_impl(cfg.impl) == "reference"

    @property
    def stats(self) -> Dict[str, Tensor]:
        """Statistics of the last forward's auxiliary loss (see :func:`summarize`); {} if none."""
        if self.summary is None:
            return {}
        return {k: v[0] for k, v in summarize(self.summary.unsqueeze(0)).items()}

    # ---- gating -------------------------------------------------------------------------
    def route(self, inp: Tensor, aux_mask: Optional[Tensor] = None, aux: bool = True):
        """Gate router inputs inp [G, d] (any dtype; computed in fp32).

        Returns (gates [G, N], idx [G, kf], w [G, kf], ce [G, N] or None). Sets the auxiliary
        loss and statistics over the groups where aux_mask [G] is True (all when None).
        """
        inp = inp.float()
        noisy = self.training and self.cfg.gate_noise
        compiling = torch.compiler.is_compiling()
        if self.reference and not compiling and reference.FUSED and gating.fused_applies(self, aux):
            return gating.route_fused(self, inp, aux_mask, noisy)  # one autograd node, no host sync
        if self.reference or compiling:
            cfg = self.cfg
            noise = torch.randn(inp.size(0), cfg.experts, device=inp.device) if noisy else None
            keep = aux_mask.float() if aux_mask is not None else None
            g, loss = reference.noisy_top_k(
                inp,
                self.w_gate.float(),
                self.w_noise.float() if noisy else None,  # (a cast is an op: only when read)
                cfg.top_k,
                noise,
                keep,
                cfg.compressed_experts,
                cfg.compressed_weighting,
                cfg.balance_loss,
                cfg.balance_weight,
                cfg.z_loss_weight,
                aux,
                cfg.gate_noise_scale,
            )
            if loss is not None:
                self.aux_loss, self.summary = loss
            return g.gates, g.topk_idx, g.topk_gates, g.compressed
        return gating.route_blocked(self, inp, aux_mask, aux, noisy)

    def default_gate(self, groups: int):
        """The learned input-independent gate, repeated for ``groups`` groups."""
        logits = self.default_logits.float().unsqueeze(0)  # (1, N)
        parts = reference.top_k_gates(
            logits, self.cfg.top_k, self.cfg.compressed_experts, self.cfg.compressed_weighting
        )
        return tuple(p.expand(groups, *p.shape[1:]) if p is not None else None for p in parts)

    # ---- granularities ------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Routing:
        """Same as :meth:`routing`. The layers call ``routing`` directly, not the module: a module
        call's output goes through forward/backward hooks (fairseq's NaN detector), which accept
        tensors only."""
        return self.routing(*args, **kwargs)

    def routing(
        self,
        x: Tensor,
        pad_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        state: Optional[dict] = None,
    ) -> Routing:
        """x: [B, T, d] router input; pad_mask: [B, T] (True = pad) or None; context: [B, d_ctx]
        for ``encoder`` routing; state: a dict kept between incremental decoding steps (x then
        holds the new positions only)."""
        self.aux_loss, self.summary = None, None
        r = self.cfg.routing
        # incremental decoding needs the context only until the gates are cached
        if r == "encoder" and context is None and (state is None or "gates" not in state):
            raise ValueError("--moe-decoder-routing encoder needs the encoder output as context")
        if state is not None:
            return self._incremental(x, pad_mask, context, state)
        return granularity.GRANULARITIES[r](self, x, pad_mask, context)

    def _mean(self, x: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
        return reference.pool(x, pad_mask) if self.reference else masked_mean(x, pad_mask)

    def _pack(self, parts, bsz: int, s: int, bounds, version: int = -1) -> Routing:
        gates, idx, w, ce = parts
        shape = lambda t: t.reshape(bsz, s, *t.shape[1:]) if t is not None else None  # noqa: E731
        return Routing(shape(gates), shape(idx), shape(w), shape(ce), bounds, version)

    # ---- incremental decoding (decoding.py) --------------------------------------------
    def gates_fixed(self, state: dict) -> bool:
        return decoding.gates_fixed(self, state)

    def skip(self, state: dict, t: int):
        decoding.skip(self, state, t)

    def _incremental(self, x, pad_mask, context, state) -> Routing:
        return decoding.incremental_routing(self, x, pad_mask, context, state)


def summarize(summaries: Tensor) -> Dict[str, Tensor]:
    """Routing statistics of R routers from their summaries [R, N + 2] (one batch of ops for all):
    balance [R] and z_loss [R] (unweighted losses), fraction [R, N] (each expert's share of the
    gate mass over the real groups) and entropy [R] of that share."""
    n = summaries.size(1) - 2
    imp = summaries[:, :n]
    frac = imp / imp.sum(1, keepdim=True)
    ent = -(frac * frac.clamp(min=1e-12).log()).sum(1)
    return {"balance": summaries[:, n], "z_loss": summaries[:, n + 1], "fraction": frac, "entropy": ent}


def _where(cond: Tensor, a, b):
    """Per-group choice between two gate tuples (cond [G])."""
    out = []
    for x, y in zip(a, b):
        if x is None:
            out.append(None)
            continue
        c = cond.view(-1, *([1] * (x.dim() - 1)))
        out.append(torch.where(c, x, y))
    return tuple(out)


def _stack(parts_list):
    """Stack gate tuples of S runs ([B, ...] each) into [B * S, ...] tuples (run-minor)."""
    out = []
    for items in zip(*parts_list):
        if items[0] is None:
            out.append(None)
            continue
        st = torch.stack(items, 1)
        out.append(st.reshape(-1, *st.shape[2:]))
    return tuple(out)


from . import decoding, gating, granularity  # noqa: E402  (they import this module)
