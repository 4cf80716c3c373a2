"""Vanilla MoE compute-then-mix: run each selected expert on its tokens, mix by the gates.

Token/expert pairs are sorted by expert so that each expert runs one matmul over its tokens
(a loop over experts, never over tokens).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .buffers import kept_empty, kept_zeros, new_grad


def _plan(idx: Tensor, n: int):
    """Token/expert pairs grouped by expert: (order of the pairs, token of each, per-expert counts)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n).tolist()
    return order, torch.div(order, idx.size(1), rounding_mode="floor"), counts


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
    m = idx.size(0)
    order, token, counts = _plan(idx, 1)  # token of each pair, grouped by expert
    gate = w.reshape(-1).index_select(0, order)
    # Each expert gathers its tokens, runs, scales by its gates and adds into the output in
    # place: no [M*k, out] concatenation or product, which cost more than the matmuls on a CPU.
    out = None
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        tok = token[start : start + c]
        se = side.index_select(0, tok) if side is not None else None
        ye = expert_fn(e, x.index_select(0, tok), se)
        ye = ye * gate[start : start + c].to(ye.dtype).unsqueeze(1)
        if out is None:
            out = ye.new_zeros(m, out_dim)
        out.index_add_(0, tok, ye)
        start += c
    return out if out is not None else x.new_zeros(m, out_dim)


class MixLinearFunction(torch.autograd.Function):
    """Compute-then-mix over linear experts with gradients written straight into [N, out, in]
    (autograd over per-expert slices would zero-fill and concatenate a full gradient).

    The gates multiply the narrow side of each linear: with out > in (fc1) the input-side
    tensors (forward: each expert's inputs, its bias added for all tokens at once by one
    ``[M, N] x [N, out]`` product of the gates; backward: the input gradient and the inputs for
    the weight gradient), with out <= in (fc2) the output-side ones, the gate gradient coming from
    the ungated outputs kept from forward (narrow there). Every per-row product then touches
    ``min(in, out)`` columns."""

    @staticmethod
    def forward(ctx, x, w, weight, bias, idx, grad_buffer=None):
        order, token, counts = _plan(idx, weight.size(0))
        gate = w.reshape(-1).index_select(0, order).to(x.dtype)
        wide = weight.size(1) > weight.size(2)  # out > in
        if wide and bias is not None:
            # the gated biases of every token at once, sum_j w_j b_{idx_j} = gates [M, N] x bias;
            # the experts' products then run without bias and are gated on their (narrow) input
            gates = w.new_zeros(idx.size(0), weight.size(0)).scatter_add_(1, idx, w).to(x.dtype)
            out = torch.mm(gates, bias, out=kept_empty(grad_buffer, "out", (x.size(0), weight.size(1)), x))
        else:
            out = kept_zeros(grad_buffer, "out", (x.size(0), weight.size(1)), x)
        # out <= in: keep the ungated outputs [pairs, out] (sorted by expert) for the gate gradient
        keep = not wide and ctx.needs_input_grad[1]
        ys = x.new_empty(order.numel(), weight.size(1)) if keep else None
        start = 0
        for e, c in enumerate(counts):
            if c:
                tok = token[start : start + c]
                ge = gate[start : start + c].unsqueeze(1)
                xe = x.index_select(0, tok)
                if wide:  # g (x W^T) = (g x) W^T: the gates multiply the narrow side
                    out.index_add_(0, tok, torch.mm(xe.mul_(ge), weight[e].t()))
                elif ys is None:
                    ye = F.linear(xe, weight[e], bias[e] if bias is not None else None)
                    out.index_add_(0, tok, ye.mul_(ge))
                else:
                    ye = ys[start : start + c]
                    if bias is not None:
                        torch.addmm(bias[e], xe, weight[e].t(), out=ye)
                    else:
                        torch.mm(xe, weight[e].t(), out=ye)
                    out.index_add_(0, tok, ye * ge)
            start += c
        ctx.save_for_backward(x, w, weight, bias, order, token, ys)
        ctx.counts, ctx.grad_buffer = counts, grad_buffer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, weight, bias, order, token, ys = ctx.saved_tensors
        need_x, need_w, need_weight, need_bias = ctx.needs_input_grad[:4]
        wide = weight.size(1) > weight.size(2)  # out > in
        gate = w.reshape(-1).index_select(0, order).to(x.dtype)
        gx = kept_zeros(ctx.grad_buffer, "grad_in", x.shape, x) if need_x else None
        gweight = None
        if need_weight:  # every expert with tokens is written whole below
            gweight = new_grad(ctx.grad_buffer, weight)
            for e, c in enumerate(ctx.counts):
                if not c:
                    gweight[e].zero_()
        gbias = torch.zeros_like(bias) if (need_bias and bias is not None) else None
        ggate = x.new_zeros(order.numel()) if need_w else None
        start = 0
        for e, c in enumerate(ctx.counts):
            if not c:
                continue
            sl = slice(start, start + c)
            tok = token[sl]
            ge = gate[sl].unsqueeze(1)
            go = grad_out.index_select(0, tok)  # [c, out]: dL/d(gated expert output)
            xe = x.index_select(0, tok) if (need_weight or (need_w and wide)) else None
            if wide:
                g_in = go @ weight[e] if (need_x or need_w) else None  # [c, in]
                if need_w:  # dL/dgate = <go, x W^T + b> = <go W, x> + <go, b>, without recomputing
                    ggate[sl] = torch.linalg.vecdot(g_in, xe)
                    if bias is not None:
                        ggate[sl] += go @ bias[e]
                if need_x:
                    gx.index_add_(0, tok, g_in.mul_(ge))
                if need_weight:  # (g go)^T x = go^T (g x)
                    torch.mm(go.t(), xe * ge, out=gweight[e])
                if gbias is not None:
                    gbias[e] = go.t() @ gate[sl]
            else:
                if need_w:  # dL/dgate = <go, x W^T + b>, the ungated output kept from forward
                    ggate[sl] = torch.linalg.vecdot(go, ys[sl])
                dy = go.mul_(ge)  # dL/d(expert output)
                if need_x:
                    gx.index_add_(0, tok, dy @ weight[e])
                if need_weight:
                    torch.mm(dy.t(), xe, out=gweight[e])
                if gbias is not None:
                    gbias[e] = dy.sum(0)
            start += c
        gw = None
        if need_w:
            gw = torch.empty_like(ggate).index_copy_(0, order, ggate).view_as(w).to(w.dtype)
        return gx, gw, gweight, gbias, None, None


def mix_linear(
    x: Tensor, idx: Tensor, w: Tensor, weight: Tensor, bias: Optional[Tensor] = None, grad_buffer=None
) -> Tensor:
    """Vanilla MoE over linear experts: y[m] = sum_j w[m, j] (x[m] W_{idx[m,j]}^T + b_{idx[m,j]}).

    x: [M, in]; idx, w: [M, k]; weight: [N, out, in]; bias: [N, out] or None; grad_buffer: optional
    :class:`~.buffers.GradBuffer` for the weight's gradient. Returns [M, out].
    """
    return MixLinearFunction.apply(x.to(weight.dtype), w, weight, bias, idx, grad_buffer)
