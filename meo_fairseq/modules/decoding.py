"""Incremental decoding, in one place: the gates of new positions consistent with the
teacher-forced forward, merged weights cached while the gates stay fixed, and beam reorders.

* :func:`incremental_routing`: the router's gates for the new positions of a decoding step (state
  kept in a dict between steps: running sums of the current segment or prefix, the gates, a
  ``version`` that changes whenever the gates change);
* :class:`MergedCache`: merged weights of fixed gates, merged once per block of rows that share
  them (the beams of a sentence, found by :func:`_runs`) and reordered with beam search;
* :class:`CachedMerges`: the expert layers' use of those caches;
* :func:`reorder_state`: beam-search reorder of a whole state.
"""

from typing import Optional

import torch
from torch import Tensor

from .experts import StackedExperts
from .merge import apply_merged, merge_weights
from .router import Router, Routing, _stack, _where

# ---- gates of new positions ---------------------------------------------------------------------


def gates_fixed(router, state: dict) -> bool:
    """Incremental decoding: are the gates of ``state`` those of every later position?
    (encoder routing once routed, prefix routing past the prefix)"""
    r = router.cfg.routing
    return (r == "encoder" and "gates" in state) or (r == "prefix" and bool(state.get("routed")))


def skip(router, state: dict, t: int):
    """Advance ``state`` by t positions whose gates are fixed (see gates_fixed), without routing."""
    if router.aux_loss is not None or router.summary is not None:  # (a module's setattr is slow)
        router.aux_loss, router.summary = None, None
    state["pos"] = state.get("pos", 0) + t


def incremental_routing(
    router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor], state: dict
) -> Routing:
    """Gates for new positions x [B, t, d], consistent with the teacher-forced forward."""
    r, cfg = router.cfg.routing, router.cfg
    bsz, t, _ = x.shape
    if r == "token":  # (decoding: no auxiliary loss, as for the cached gates of other routings)
        return router._pack(router.route(x.reshape(bsz * t, -1), aux=False), bsz, t, None)
    if r == "sequence":
        raise ValueError("sequence routing is not causal; a decoder needs encoder/segment/prefix/full")
    p0 = state.get("pos", 0)
    if gates_fixed(router, state):  # one run with the cached gates ([B, ...] = one run stacked)
        state["pos"] = p0 + t
        return router._pack(state["gates"], bsz, 1, [0, t], state["version"])
    keep = torch.ones(bsz, t, 1, device=x.device) if pad_mask is None else (~pad_mask).float().unsqueeze(-1)
    xk = x.float() * keep
    runs, bounds = [], [0]
    p, end = p0, p0 + t

    def accumulate(a, b):
        state["sum"] = state.get("sum", 0) + xk[:, a - p0 : b - p0].sum(1)
        state["count"] = state.get("count", 0) + keep[:, a - p0 : b - p0].sum(1)

    def set_gates(parts):
        state["gates"] = parts
        state["version"] = state.get("version", 0) + 1

    def routed_or_default():
        cnt = state["count"].squeeze(-1)
        valid = cnt > 0
        routed = router.route(state["sum"] / cnt.clamp(min=1.0).unsqueeze(-1), aux=False)
        return _where(valid, routed, router.default_gate(bsz))

    while p < end:
        if r == "encoder":
            if "gates" not in state:
                set_gates(router.route(context, aux=False))
            q = end
        elif r == "segment":
            seg = cfg.segment_length
            if p % seg == 0:
                set_gates(router.default_gate(bsz) if p == 0 else routed_or_default())
                state.pop("sum", None), state.pop("count", None)
            q = min(end, (p // seg + 1) * seg)
            accumulate(p, q)
        elif r == "prefix":
            pl = cfg.prefix_length
            if p < pl:
                if "gates" not in state:
                    set_gates(router.default_gate(bsz))
                q = min(end, pl)
                accumulate(p, q)
            else:
                if not state.get("routed"):
                    set_gates(routed_or_default())
                    state["routed"] = True
                q = end
        else:  # full: route on the running mean of everything seen (re-merges every step)
            q = p + 1
            accumulate(p, q)
            set_gates(routed_or_default())
        runs.append(state["gates"])
        bounds.append(q - p0)
        p = q
    state["pos"] = end
    parts = _stack(runs)
    return router._pack(parts, bsz, len(runs), bounds, state.get("version", -1))


# ---- cached merged weights ----------------------------------------------------------------------


def _runs(gates: Tensor) -> int:
    """Rows per block when gates [G, N] come in blocks of equal consecutive rows of one length
    (beam search repeats a sentence's gates over its beams), else 1."""
    g = gates.size(0)
    if g < 2:
        return 1
    starts = torch.ones(g, dtype=torch.bool, device=gates.device)
    starts[1:] = (gates[1:] != gates[:-1]).any(1)
    s = int(starts.sum())
    if g % s or s == g:
        return 1
    b = g // s
    return b if bool(starts.view(s, b)[:, 0].all()) and not bool(starts.view(s, b)[:, 1:].any()) else 1


class MergedCache:
    """Merged weights of fixed gates, kept across decoding steps (``version``: the router's).

    Rows come in blocks of ``block`` rows with the same gates (the beams of a sentence), so the
    weights are merged once per block: ``weight`` [G / block, out, in], ``bias`` [G / block, out].
    ``reorder`` follows beam search; an order that mixes blocks falls back to one matrix per row.
    """

    def __init__(self, version: int, rows: int, block: int, weight: Tensor, bias: Optional[Tensor]):
        self.version, self.rows, self.block, self.weight, self.bias = version, rows, block, weight, bias

    @classmethod
    def build(cls, version: int, gates: Tensor, experts: StackedExperts, block: int = 1) -> "MergedCache":
        w, b = merge_weights(gates[::block], experts.weight, experts.bias)
        return cls(version, gates.size(0), block, w, b)

    def apply(self, x: Tensor) -> Tensor:
        """x [rows, t, in] -> [rows, t, out]."""
        rows, t = x.shape[:2]
        s = self.weight.size(0)
        return apply_merged(x.reshape(s, self.block * t, -1), self.weight, self.bias).view(rows, t, -1)

    def reorder(self, new_order: Tensor) -> "MergedCache":
        n, b = new_order.numel(), self.block
        src = torch.div(new_order, b, rounding_mode="floor")  # source block of every new row
        if b > 1 and n % b == 0:
            blocks = src.view(-1, b)
            if bool((blocks == blocks[:, :1]).all()):  # every new block comes from one old block
                pick = blocks[:, 0]
                if pick.numel() == self.weight.size(0) and torch.equal(
                    pick, torch.arange(pick.numel(), device=pick.device)
                ):
                    return MergedCache(
                        self.version, n, b, self.weight, self.bias
                    )  # beams moved inside their sentences
                return MergedCache(
                    self.version, n, b, self.weight.index_select(0, pick), _select(self.bias, pick)
                )
        return MergedCache(self.version, n, 1, self.weight.index_select(0, src), _select(self.bias, src))


def _select(t: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
    return t.index_select(0, index) if t is not None else None


def reorder_state(state, new_order: Tensor):
    """Reorder an incremental-decoding state (beam search): every tensor is batch-first.

    fairseq reorders at every step; an identity order (greedy decoding, nothing finished) leaves
    the state as it is (checked on the CPU only, where it saves copying cached merged weights)."""
    n = new_order.numel()
    if (
        new_order.device.type == "cpu"
        and n
        and torch.equal(new_order, torch.arange(n, dtype=new_order.dtype))
    ):
        return _reorder(state, new_order, n)
    return _reorder(state, new_order, None)


def _reorder(state, new_order: Tensor, identity_size: Optional[int]):
    if isinstance(state, MergedCache):
        return state if state.rows == identity_size else state.reorder(new_order)
    if isinstance(state, Tensor):
        if state.dim() == 0 or state.size(0) == identity_size:
            return state
        return state.index_select(0, new_order)
    if isinstance(state, dict):
        return {k: _reorder(v, new_order, identity_size) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(_reorder(v, new_order, identity_size) for v in state)
    return state


class CachedMerges:
    """Decoding with merged weights cached in the layer's state (mixed into the expert layers)."""

    def _static_gates(self, routing: Routing, state) -> bool:
        """Incremental decoding with one run whose gates stay for later steps (cacheable)."""
        return (
            state is not None
            and routing.bounds is not None
            and len(routing.bounds) == 2
            and self.cfg.routing != "full"
        )

    @staticmethod
    def _hits(state, keys, version, rows: int) -> Optional[list]:
        """The cached merged weights under ``keys`` if all are for these gates and rows, else None."""
        hits = [state.get(k) for k in keys]
        if all(h is not None and h.version == version and h.rows == rows for h in hits):
            return hits
        return None

    def _fixed_step(self, state, keys, router: Router, x: Tensor, scaled: bool) -> Optional[list]:
        """Decoding fast path: when the gates are fixed for the rest of the sentence and their
        merged weights are cached, advance the router without routing and return the caches."""
        rs = state.get("router")
        if rs is None or scaled or not gates_fixed(router, rs):
            return None
        hits = self._hits(state, keys, rs.get("version"), x.size(0))
        if hits is not None:
            skip(router, rs, x.size(1))
        return hits

    def _use_cache(self, state, keys, version, gates: Tensor, tokens_per_group: int) -> int:
        """Decoding with fixed gates: the rows per block sharing gates if cached merged weights
        (merged once per block) should run rather than mixing (the cost model), else 0."""
        hits = self._hits(state, keys, version, gates.size(0))
        if hits is not None:
            return hits[0].block
        block = _runs(gates)
        return (
            block if self.choose_merge(gates.size(0) // block, tokens_per_group * block, cached=True) else 0
        )

    @staticmethod
    def _cached_merge(state, key, version, gates, experts: StackedExperts, block: int) -> MergedCache:
        hit = state.get(key)
        if hit is None or hit.version != version or hit.rows != gates.size(0):
            hit = state[key] = MergedCache.build(version, gates, experts, block)
        return hit
