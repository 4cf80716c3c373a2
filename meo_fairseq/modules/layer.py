"""Expert layers: :class:`ExpertLinear` (one FFN linear) and :class:`MoEFFN` (a whole FFN).

Both take batch-first inputs ``x`` [B, T, d] with an optional padding mask [B, T] (True = pad),
an optional context vector [B, d_ctx] (``encoder`` routing) and an optional ``state`` dict kept
between incremental decoding steps (then ``x`` holds only the new positions; reorder it for beam
search with :func:`reorder_state`).

Modes (``MoEConfig.mode``): ``dense`` runs the single expert as a plain linear; ``moe`` runs the
selected experts and mixes their outputs (compute-then-mix); ``meo`` merges the selected experts
per routing group and runs one linear (merge-then-compute). For linear experts the two are the
same function.

Implementations (``MoEConfig.impl``, chosen once per layer at build, see :func:`set_impl`):
``reference`` runs reference.py (plain autograd, no host syncs, compiles whole); ``blocked`` runs
the CPU kernels (gating.py, merge.py, dispatch.py), where MEO may mix instead of merging when the
cost model (costs.py) says so. Under ``torch.compile`` every layer takes the reference path.
"""

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .config import MoEConfig, resolve_impl
from .costs import CALL_COST, GROUP_COST, STREAM_COST, choose_merge  # noqa: F401  (old names kept here)
from .decoding import CachedMerges, MergedCache, _runs, reorder_state  # noqa: F401  (old names kept here)
from .dispatch import dispatch, mix_linear
from .experts import StackedExperts, TokenBlock
from .merge import merged_linear
from .reference import Gates
from .router import Router, Routing


def _grouped(x: Tensor, routing: Routing, fn: Callable) -> Tensor:
    """Apply fn(xg (G, Tg, in), gates: Gates) per routing run and reassemble (B, T, out).

    Gates (reference.py): ``gates`` (G, N), ``topk_idx``/``topk_gates`` (G, kf), ``compressed``
    (G, N) or None, one row per group of ``xg``."""
    bsz, t = x.shape[:2]
    if routing.bounds is None:  # token routing: every token is a group of one
        y = fn(x.reshape(bsz * t, 1, -1), routing.flat())  # groups of one token
        return y.reshape(bsz, t, -1)
    bounds = routing.bounds
    s = len(bounds) - 1
    if s == 1:
        return fn(x, routing.flat())
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    seg = lens[0]
    pad = s * seg - t
    if all(n == seg for n in lens[:-1]) and 0 <= pad and 4 * pad <= t:
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x
        y = fn(xp.reshape(bsz * s, seg, -1), routing.flat()).reshape(bsz, s * seg, -1)  # (B, S*L, out)
        return y[:, :t] if pad else y
    return torch.cat(
        [fn(x[:, a:b], routing.run(i).flat()) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], 1
    )


def _expand(t: Tensor, tokens: int) -> Tensor:
    """Per-group [G, k] -> per-token [G * tokens, k]."""
    return t.unsqueeze(1).expand(t.size(0), tokens, t.size(1)).reshape(-1, t.size(1))


def set_impl(module: nn.Module, impl: str):
    """Switch every expert layer and router under ``module`` to ``impl`` (auto, reference or
    blocked; ``auto`` resolves now). Parameters and outputs stay the same."""
    impl = resolve_impl(impl)
    for m in module.modules():
        if isinstance(m, _ExpertBase):
            m.impl = impl
        elif isinstance(m, Router):
            m.reference = impl == "reference"


class _ExpertBase(CachedMerges, nn.Module):
    cfg: MoEConfig
    impl: str = "blocked"
    router: Optional[Router]

    @property
    def l_aux(self) -> Optional[Tensor]:
        """The weighted auxiliary loss of this layer's own router in the last forward (None: no
        router of its own, or no loss). Criteria sum it over the model's layers (moe_aux.py)."""
        return self.router.aux_loss if self.router is not None else None

    @property
    def routing_summary(self) -> Optional[Tensor]:
        """(N + 2,) routing statistics of the last forward (see router.summarize), or None."""
        return self.router.summary if self.router is not None else None

    @property
    def _block_first(self) -> bool:
        """Token-level MEO in the authors' encoder order: the block runs before routing."""
        return self.token_block is not None and self.cfg.token_block_order == "block_first"

    @property
    def use_reference(self) -> bool:
        """reference.py's functions (chosen at build, or under torch.compile) instead of the
        blocked CPU kernels; the same functions."""
        return self.impl == "reference" or torch.compiler.is_compiling()

    @torch.no_grad()
    def _reset_routing_(self):
        """Zero this layer's own router and make its token block the identity (upcycling)."""
        if self.router is not None:
            for p in self.router.parameters():
                p.zero_()
        if self.token_block is not None:
            self.token_block.reset_identity_()

    def choose_merge(self, groups: int, tokens_per_group: float, cached: bool) -> bool:
        """Merge-then-compute (True) or compute-then-mix for linear experts: the same function;
        the blocked path's cost model (costs.py) picks the cheaper one."""
        cfg = self.cfg
        return choose_merge(
            cfg.experts,
            cfg.full_experts,
            self.experts.weight[0].numel(),
            groups,
            tokens_per_group,
            cached,
            cfg.merge_min_tokens,
        )


class ExpertLinear(_ExpertBase):
    """A linear layer made of N experts: ``experts`` (StackedExperts), ``router`` (own router,
    expert unit ``linear``; None when a parent routes, expert unit ``ffn``), ``token_block``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: MoEConfig,
        router_dim: Optional[int] = None,
        bias: bool = True,
        own_router: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.impl = resolve_impl(cfg.impl)
        dense = cfg.mode == "dense"
        self.experts = StackedExperts(
            in_features,
            out_features,
            1 if dense else cfg.experts,
            bias,
            compressed=not dense and cfg.compressed_experts > 0,
        )
        self.router = Router(router_dim or in_features, cfg) if (own_router and not dense) else None
        self.token_block = TokenBlock(in_features) if (own_router and cfg.token_block) else None

    def forward(
        self,
        x: Tensor,
        pad_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        state: Optional[dict] = None,
        routing: Optional[Routing] = None,
    ) -> Tensor:
        """x: [B, T, in] -> [B, T, out]. ``routing`` is given by a parent when it routes."""
        if self.cfg.mode == "dense":
            return self.experts.dense(x)
        if self._block_first:
            x = self.token_block(x)  # (B, T, in): the router reads x + block(x)
        if routing is None and state is not None:
            y = self._cached_step(x, state)
            if y is not None:
                return y
        if routing is None:
            routing = self.router.routing(
                x, pad_mask, context, state.setdefault("router", {}) if state is not None else None
            )
        if self.token_block is not None and not self._block_first:
            x = self.token_block(x)  # (B, T, in): the router read x
        cache = state if self._static_gates(routing, state) else None
        return _grouped(x, routing, lambda xg, g: self._compute(xg, g, routing=routing, cache=cache))

    def _cached_step(self, x: Tensor, state: dict) -> Optional[Tensor]:
        """Decoding fast path (see _fixed_step); None: not applicable."""
        hits = self._fixed_step(state, ("merged",), self.router, x, self.experts.scales is not None)
        if hits is None:
            return None
        if self.token_block is not None and not self._block_first:
            x = self.token_block(x)
        return hits[0].apply(x)

    def _compute(self, xg: Tensor, g: Gates, routing: Routing, cache) -> Tensor:
        """One linear for xg (G, Tg, in) whose groups share the gates g -> (G, Tg, out)."""
        gates, idx, w, ce = g
        ex = self.experts
        s = ex.input_scale(ce)
        if s is not None:
            xg = xg * s.unsqueeze(1).to(xg.dtype)
        groups, tg = xg.shape[:2]
        if self.use_reference and (cache is None or self.cfg.mode != "meo"):
            if self.cfg.mode == "meo":
                return reference.merged_linear(xg, gates, ex.weight, ex.bias)
            y = reference.moe_linear(
                xg.reshape(groups * tg, -1), _expand(idx, tg), _expand(w, tg), ex.weight, ex.bias
            )
            return y.view(groups, tg, -1)
        if self.cfg.mode == "meo" and cache is not None:
            # reference: always merge, one merged matrix per row (no host sync to find beam blocks)
            block = (
                1 if self.use_reference else self._use_cache(cache, ("merged",), routing.version, gates, tg)
            )
            if block:
                return self._cached_merge(cache, "merged", routing.version, gates, ex, block).apply(xg)
        elif self.cfg.mode == "meo" and self.choose_merge(groups, tg, cached=False):
            return merged_linear(xg, gates, ex.weight, ex.bias, ex.grad_buffer)
        # vanilla MoE, or (blocked path only) MEO that mixes instead of merging where the cost
        # model says so (costs.py): the same function, computed as compute-then-mix
        y = mix_linear(
            xg.reshape(groups * tg, -1), _expand(idx, tg), _expand(w, tg), ex.weight, ex.bias, ex.grad_buffer
        )
        return y.view(groups, tg, -1)

    @torch.no_grad()
    def upcycle_(self, weight: Tensor, bias: Optional[Tensor]):
        """Become N copies of a dense linear; zero router; identity token block."""
        self.experts.copy_dense_(weight, bias)
        self._reset_routing_()


class MoEFFN(_ExpertBase):
    """A whole FFN ``fc2(dropout(act(fc1(x))))`` with experts.

    Expert unit ``linear``: fc1 and fc2 are :class:`ExpertLinear` with their own routers (the
    authors' layout). Expert unit ``ffn``: one ``router`` routes fc1 and fc2 together, so an
    expert is a whole FFN (Switch/GShard for ``moe``; SMEAR/Lory-style merged FFN for ``meo``).
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        cfg: MoEConfig,
        activation_fn: Callable[[Tensor], Tensor] = F.relu,
        activation_dropout=0.0,
        router_dim: Optional[int] = None,
        bias: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.impl = resolve_impl(cfg.impl)
        self.activation_fn = activation_fn
        # a float, or a module (fairseq passes its FairseqDropout)
        self.activation_dropout = (
            activation_dropout
            if isinstance(activation_dropout, nn.Module)
            else nn.Dropout(activation_dropout)
        )
        shared = cfg.expert_unit == "ffn" and cfg.mode != "dense"
        self.fc1 = ExpertLinear(embed_dim, ffn_dim, cfg, router_dim, bias, own_router=not shared)
        self.fc2 = ExpertLinear(ffn_dim, embed_dim, cfg, router_dim, bias, own_router=not shared)
        self.router = Router(router_dim or embed_dim, cfg) if shared else None
        self.token_block = TokenBlock(embed_dim) if (shared and cfg.token_block) else None

    def forward(
        self,
        x: Tensor,
        pad_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        state: Optional[dict] = None,
    ) -> Tensor:
        """x: [B, T, embed_dim] -> [B, T, embed_dim]."""
        if self.router is None:
            sub = (lambda k: state.setdefault(k, {})) if state is not None else (lambda k: None)
            h = self.activation_dropout(self.activation_fn(self.fc1(x, pad_mask, context, sub("fc1"))))
            return self.fc2(h, pad_mask, context, sub("fc2"))
        if self._block_first:
            x = self.token_block(x)  # (B, T, d): the router reads x + block(x)
        if state is not None:
            y = self._cached_step(x, state)
            if y is not None:
                return y
        routing = self.router.routing(
            x, pad_mask, context, state.setdefault("router", {}) if state is not None else None
        )
        if self.token_block is not None and not self._block_first:
            x = self.token_block(x)  # (B, T, d): the router read x
        if self.cfg.mode == "moe":
            return _grouped(x, routing, self._mix)
        cache = state if self._static_gates(routing, state) else None
        return _grouped(x, routing, lambda xg, g: self._merge(xg, g, version=routing.version, cache=cache))

    def _cached_step(self, x: Tensor, state: dict) -> Optional[Tensor]:
        """Decoding fast path of the shared router (see _fixed_step); None: not applicable."""
        scaled = self.fc1.experts.scales is not None or self.fc2.experts.scales is not None
        hits = self._fixed_step(state, ("merged1", "merged2"), self.router, x, scaled)
        if hits is None:
            return None
        if self.token_block is not None and not self._block_first:
            x = self.token_block(x)
        return hits[1].apply(self.activation_dropout(self.activation_fn(hits[0].apply(x))))

    def _merge(self, xg: Tensor, g: Gates, version: int, cache) -> Tensor:
        """MEO FFN (expert unit ``ffn``): xg (G, Tg, d) -> (G, Tg, d)."""
        gates, ce = g.gates, g.compressed
        e1, e2 = self.fc1.experts, self.fc2.experts
        s1, s2 = e1.input_scale(ce), e2.input_scale(ce)
        if s1 is not None:
            xg = xg * s1.unsqueeze(1).to(xg.dtype)
        if cache is not None:
            hits = self._hits(cache, ("merged1", "merged2"), version, gates.size(0))
            block = hits[0].block if hits is not None else (1 if self.use_reference else _runs(gates))
            h = self._cached_merge(cache, "merged1", version, gates, e1, block).apply(xg)
        elif self.use_reference:
            h = reference.merged_linear(xg, gates, e1.weight, e1.bias)
        else:
            h = merged_linear(xg, gates, e1.weight, e1.bias, e1.grad_buffer)
        h = self.activation_dropout(self.activation_fn(h))
        if s2 is not None:
            h = h * s2.unsqueeze(1).to(h.dtype)
        if cache is not None:
            return self._cached_merge(cache, "merged2", version, gates, e2, block).apply(h)
        if self.use_reference:
            return reference.merged_linear(h, gates, e2.weight, e2.bias)
        return merged_linear(h, gates, e2.weight, e2.bias, e2.grad_buffer)

    def _mix(self, xg: Tensor, g: Gates) -> Tensor:
        """Vanilla MoE FFN (expert unit ``ffn``): xg (G, Tg, d) -> (G, Tg, d)."""
        idx, w, ce = g.topk_idx, g.topk_gates, g.compressed
        e1, e2 = self.fc1.experts, self.fc2.experts
        groups, tg = xg.shape[:2]
        s1, s2 = e1.input_scale(ce), e2.input_scale(ce)
        if s1 is not None:
            xg = xg * s1.unsqueeze(1).to(xg.dtype)
        side = s2.repeat_interleave(tg, 0) if s2 is not None else None
        if self.use_reference:
            return self._mix_reference(xg, idx, w, side).view(groups, tg, -1)
        # unbind once (see dispatch.mix_linear)
        w1, w2 = e1.weight.unbind(0), e2.weight.unbind(0)
        b1 = e1.bias.unbind(0) if e1.bias is not None else [None] * len(w1)
        b2 = e2.bias.unbind(0) if e2.bias is not None else [None] * len(w2)

        def ffn(e, xe, se):
            h = self.activation_dropout(self.activation_fn(F.linear(xe, w1[e], b1[e])))
            if se is not None:
                h = h * se.to(h.dtype)
            return F.linear(h, w2[e], b2[e])

        y = dispatch(
            xg.reshape(groups * tg, -1).to(e1.weight.dtype),
            _expand(idx, tg),
            _expand(w, tg),
            ffn,
            e2.out_features,
            side,
        )
        return y.view(groups, tg, -1)

    def _mix_reference(self, xg, idx, w, side):
        """reference.moe_apply over whole-FFN experts: (G, Tg, d) -> (G * Tg, d)."""
        e1, e2 = self.fc1.experts, self.fc2.experts
        tg = xg.size(1)

        def ffn(xs, offsets, expert, token):  # xs (R, d) sorted by expert
            h = self.activation_dropout(
                self.activation_fn(reference.grouped_linear(xs, e1.weight, e1.bias, offsets, expert))
            )
            if side is not None:
                h = h * side.index_select(0, token).to(h.dtype)
            return reference.grouped_linear(h, e2.weight, e2.bias, offsets, expert)

        x = xg.reshape(-1, xg.size(-1)).to(e1.weight.dtype)  # (G * Tg, d)
        return reference.moe_apply(x, _expand(idx, tg), _expand(w, tg), ffn, e1.num_experts, e2.out_features)

    @torch.no_grad()
    def upcycle_(
        self, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor]
    ):
        """Initialise from a dense FFN so that the layer computes exactly the dense function."""
        self.fc1.upcycle_(fc1_weight, fc1_bias)
        self.fc2.upcycle_(fc2_weight, fc2_bias)
        self._reset_routing_()

    def routers(self):
        return [m for m in self.modules() if isinstance(m, Router)]
