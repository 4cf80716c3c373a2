"""Vanilla MoE compute-then-mix: run each selected expert on its tokens, mix by the gates.

Token/expert pairs are sorted by expert so that each expert runs one matmul over a contiguous
block of its tokens (a loop over experts, never over tokens).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def dispatch(
    x: Tensor,
    idx: Tensor,
    w: Tensor,
    expert_fn: Callable[[int, Tensor, Optional[Tensor]], Tensor],
    out_dim: int,
    side: Optional[Tensor] = None,
) -> Tensor:
    """y[m] = sum_j w[m, j] expert_fn(idx[m, j], x[m]).

    Args:
        x: [M, in] tokens; idx: [M, k] selected experts (long); w: [M, k] their gates
        expert_fn(e, xe [c, in], side_e [c, ...] or None) -> [c, out_dim]
        side: optional per-token tensor [M, ...] handed to expert_fn in the same order as xe
    Returns:
        [M, out_dim]
    """
    m, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    token = torch.div(order, k, rounding_mode="floor")
    xs = x.index_select(0, token)  # [M*k, in], grouped by expert
    ss = side.index_select(0, token).split(counts) if side is not None else [None] * len(counts)
    outs = [expert_fn(e, xe, se) for e, (xe, se) in enumerate(zip(xs.split(counts), ss)) if xe.size(0)]
    ys = torch.cat(outs, 0) if outs else xs.new_zeros(0, out_dim)
    ys = ys * w.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
    return ys.new_zeros(m, out_dim).index_add_(0, token, ys)


def mix_linear(x: Tensor, idx: Tensor, w: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Vanilla MoE over linear experts: y[m] = sum_j w[m, j] (x[m] W_{idx[m,j]}^T + b_{idx[m,j]}).

    x: [M, in]; idx, w: [M, k]; weight: [N, out, in]; bias: [N, out] or None. Returns [M, out].
    """

    # unbind once: indexing weight[e] per expert would make backward build a full-size zero
    # gradient for every expert and add them up
    ws = weight.unbind(0)
    bs = bias.unbind(0) if bias is not None else [None] * len(ws)

    def run(e, xe, _):
        return F.linear(xe, ws[e], bs[e])

    return dispatch(x.to(weight.dtype), idx, w, run, weight.size(1))
