"""Routing granularities: which positions share a gate, and what the gate reads.

Each function takes the router (its ``route`` and ``default_gate`` compute gates for pooled
inputs), x (B, T, d), pad_mask (B, T) True = pad, and context (B, d_ctx) for ``encoder``
routing, and returns a :class:`~.router.Routing` (gates per run of positions). Incremental
decoding has its own counterpart in decoding.py.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .router import Routing, _stack, _where


def route_tokens(router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Routing:
    """token: every token routes on itself; T runs of one token."""
    bsz, t, _ = x.shape  # (B, T, d)
    keep = None if pad_mask is None else ~pad_mask.reshape(-1)
    parts = router.route(x.reshape(bsz * t, -1), keep)
    return router._pack(parts, bsz, t, None)


def route_encoder(router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Routing:
    """encoder: one gate per sequence from the context (B, d_ctx), e.g. the encoder mean."""
    bsz, t, _ = x.shape  # (B, T, d)
    return router._pack(router.route(context), bsz, 1, [0, t])


def route_sequence(router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Routing:
    """sequence / full: one gate per sequence from the masked mean over T."""
    bsz, t, _ = x.shape  # (B, T, d)
    keep = None if pad_mask is None else (~pad_mask).any(1)
    return router._pack(router.route(router._mean(x, pad_mask), keep), bsz, 1, [0, t])


def route_prefix(router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Routing:
    """prefix: positions < P take the learned default gate, the rest route on the mean of the
    first P tokens (a prefix without real tokens: the default gate)."""
    bsz, t, _ = x.shape  # (B, T, d)
    p = router.cfg.prefix_length
    if t <= p:
        return router._pack(router.default_gate(bsz), bsz, 1, [0, t])
    head_mask = pad_mask[:, :p] if pad_mask is not None else None
    mean = router._mean(x[:, :p], head_mask)
    if pad_mask is None:
        routed = router.route(mean)
    else:  # no real token in the prefix: default gate; aux over routed, non-empty tails
        valid = (~head_mask).any(1)
        routed = router.route(mean, valid & (~pad_mask[:, p:]).any(1))
        routed = _where(valid, routed, router.default_gate(bsz))
    return router._pack(_stack([router.default_gate(bsz), routed]), bsz, 2, [0, p, t])


def route_segments(router, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Routing:
    """segment: segment j routes on the masked mean of segment j-1; segment 0 takes the
    learned default gate."""
    bsz, t, _ = x.shape  # (B, T, d)
    seg = router.cfg.segment_length
    s = math.ceil(t / seg)
    bounds = [min(i * seg, t) for i in range(s + 1)]
    if s == 1:
        return router._pack(router.default_gate(bsz), bsz, 1, bounds)
    xf = x.float()
    keep = torch.ones(bsz, t, device=x.device) if pad_mask is None else (~pad_mask).float()
    pad_t = s * seg - t
    if pad_t:
        xf = F.pad(xf, (0, 0, 0, pad_t))
        keep = F.pad(keep, (0, pad_t))
    xk = xf if pad_mask is None else xf * keep.unsqueeze(-1)  # (no padding: nothing to zero)
    sums = xk.view(bsz, s, seg, -1).sum(2)  # [B, S, d]
    cnt = keep.view(bsz, s, seg).sum(2)  # [B, S]
    means = sums / cnt.clamp(min=1.0).unsqueeze(-1)
    valid_prev = cnt[:, :-1] > 0  # [B, S-1]: segment j-1 has real tokens
    aux_mask = (valid_prev & (cnt[:, 1:] > 0)).reshape(-1)
    routed = router.route(means[:, :-1].reshape(bsz * (s - 1), -1), aux_mask)
    routed = _where(valid_prev.reshape(-1), routed, router.default_gate(bsz * (s - 1)))
    first = router.default_gate(bsz)
    parts = []
    for d0, rt in zip(first, routed):
        if d0 is None:
            parts.append(None)
            continue
        rt = rt.reshape(bsz, s - 1, *rt.shape[1:])
        parts.append(torch.cat([d0.unsqueeze(1), rt], 1).reshape(bsz * s, *rt.shape[2:]))
    return router._pack(tuple(parts), bsz, s, bounds)


GRANULARITIES = {
    "token": route_tokens,
    "encoder": route_encoder,
    "sequence": route_sequence,
    "full": route_sequence,
    "prefix": route_prefix,
    "segment": route_segments,
}
