"""The MEO math: merge the selected experts of a routing group, then run one linear.

For linear experts ``W_i`` (out x in), ``b_i`` and gates ``g`` (zeros for unselected experts)::

    W = sum_i g_i W_i,  b = sum_i g_i b_i,  y = x W^T + b

which is the same function as vanilla MoE ``y = sum_i g_i (x W_i^T + b_i)`` with the same gates.
The merge is one ``[G, N] x [N, out*in]`` product (no ``[G, k, out, in]`` gather). The merged
weights (G x out x in, far larger than the dense weight) are not kept for backward: the custom
autograd function saves ``x`` and the gates and recomputes them, a chunk of groups at a time.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

# Bytes of merged weights alive at once (forward and backward work on chunks of groups).
MERGE_CHUNK_BYTES = 32 * 2**20


def merge_weights(gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Merge stacked experts.

    Args:
        gates: [G, N] (zeros for unselected experts)
        weight: [N, out, in]; bias: [N, out] or None
    Returns:
        merged weight [G, out, in], merged bias [G, out] or None
    """
    n, out_f, in_f = weight.shape
    g = gates.to(weight.dtype)
    w = torch.mm(g, weight.reshape(n, out_f * in_f)).view(-1, out_f, in_f)
    b = torch.mm(g, bias) if bias is not None else None
    return w, b


def _chunks(num_groups: int, weight: Tensor):
    per_group = weight[0].numel() * weight.element_size()
    step = max(1, MERGE_CHUNK_BYTES // max(per_group, 1))
    for start in range(0, num_groups, step):
        yield slice(start, min(start + step, num_groups))


class MergedLinearFunction(torch.autograd.Function):
    """y[g] = x[g] (sum_i gates[g,i] W_i)^T + sum_i gates[g,i] b_i, recomputing merges in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor]):
        g_total, t, _ = x.shape
        out = x.new_empty(g_total, t, weight.size(1))
        for sl in _chunks(g_total, weight):
            w, b = merge_weights(gates[sl], weight, bias)
            if b is not None:
                torch.baddbmm(b.unsqueeze(1), x[sl], w.transpose(1, 2), out=out[sl])
            else:
                torch.bmm(x[sl], w.transpose(1, 2), out=out[sl])
        ctx.save_for_backward(x, gates, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gates, weight, bias = ctx.saved_tensors
        need_x, need_g, need_w, need_b = ctx.needs_input_grad[:4]
        n, out_f, in_f = weight.shape
        grad_out = grad_out.contiguous()
        gx = torch.empty_like(x) if need_x else None
        gg = torch.zeros(gates.shape, dtype=weight.dtype, device=gates.device) if need_g else None
        gw = torch.zeros_like(weight).view(n, -1) if need_w else None
        gb = torch.zeros_like(bias) if (need_b and bias is not None) else None
        w_flat = weight.reshape(n, -1)
        for sl in _chunks(x.size(0), weight):
            dy = grad_out[sl]
            g = gates[sl].to(weight.dtype)
            if need_x:
                w, _ = merge_weights(gates[sl], weight)
                torch.bmm(dy, w, out=gx[sl])
                del w
            if need_g or need_w:
                dw = torch.bmm(dy.transpose(1, 2), x[sl]).view(dy.size(0), -1)  # [c, out*in]
                if need_g:
                    gg[sl] = torch.mm(dw, w_flat.t())
                if need_w:
                    gw.addmm_(g.t(), dw)
                del dw
            if bias is not None and (need_g or need_b):
                db = dy.sum(1)  # [c, out]
                if need_g:
                    gg[sl] += torch.mm(db, bias.t())
                if need_b:
                    gb.addmm_(g.t(), db)
        if gg is not None:
            gg = gg.to(gates.dtype)
        if gw is not None:
            gw = gw.view_as(weight)
        return gx, gg, gw, gb


def merged_linear(x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """MEO linear for routing groups.

    Args:
        x: [G, T, in] inputs, grouped so that the T tokens of group g share gates[g]
        gates: [G, N] gates (zeros for unselected experts), any float dtype
        weight: [N, out, in]; bias: [N, out] or None
    Returns:
        [G, T, out]
    """
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return MergedLinearFunction.apply(x, gates, weight, bias)


def apply_merged(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """Run already merged weights (cached for decoding): x [G, T, in], w [G, out, in], b [G, out]."""
    x = x.to(w.dtype)
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
