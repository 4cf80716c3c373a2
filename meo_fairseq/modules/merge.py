"""MEO's blocked CPU kernel (impl="blocked"): merge the selected experts of a group, one linear.

For linear experts ``W_i`` (out x in), ``b_i`` and gates ``g`` (zeros for unselected experts)::

    W = sum_i g_i W_i,  b = sum_i g_i b_i,  y = x W^T + b

which is the same function as vanilla MoE ``y = sum_i g_i (x W_i^T + b_i)`` with the same gates.
The merge is a ``[G, N] x [N, out*in]`` product (no ``[G, k, out, in]`` gather).

The merged weights (G x out x in, far larger than the dense weight) are never materialised whole
and never kept for backward. The custom autograd function saves ``x`` and the gates, and works
on blocks of output rows: for a block it merges those rows of every group of a chunk (a
``[G, N] x [N, rows*in]`` product) and uses them at once, while they are in cache: forward, the
matmul producing those output columns; backward, the input-gradient contribution of those rows
and, from the same rows of the per-group weight gradient ``dy_g^T x_g``, the gate gradient
``<dW_g, W_i>`` and the expert gradient ``sum_g g_gi dW_g``. Every expert is read from memory
once per chunk of groups and pass, every output written once, and the only scratch memory is
one block buffer (never a whole merged matrix), taken from the scratch storage of buffers.py so
that its pages fault once, not at every call. A single group on the CPU merges only its
selected experts.

Small problems (all groups' merged weights within one block) take a short path with the same
products in a few calls: small layers are bound by per-call costs.

What is left against a dense FFN is mostly traffic over all N experts that a dense layer does
not have (reading them for the merges and the gate gradient, writing the N x out x in expert
gradient) and the per-group matmuls. Figures: docs/layer-library.md. The same function in plain
autograd is reference.merged_linear.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .buffers import new_grad, scratch

# the blocked merge's tiles (tuned constants live in costs.py; read here through these names)
from .costs import MERGE_BLOCK_BYTES, MERGE_BLOCK_BYTES_CUDA, MERGE_CHUNK_BYTES, MERGE_MIN_ROWS


def _block_bytes(t: Tensor) -> int:
    return MERGE_BLOCK_BYTES_CUDA if t.device.type == "cuda" else MERGE_BLOCK_BYTES


def merge_weights(
    gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor]]:
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


def _row_blocks(groups: int, weight: Tensor):
    """Blocks (start, stop) of output rows, even in size, for a chunk of ``groups`` groups."""
    _, out_f, in_f = weight.shape
    block = _block_bytes(weight)
    budget = min(block, MERGE_CHUNK_BYTES)
    rows = budget // max(groups * in_f * weight.element_size(), 1)
    if budget >= block:  # (a tiny MERGE_CHUNK_BYTES asks for tiny blocks)
        rows = max(rows, MERGE_MIN_ROWS)
    rows = max(1, min(out_f, rows))
    if rows < out_f:  # even blocks
        nblocks = -(-out_f // rows)
        rows = -(-out_f // nblocks)
    return [(r, min(r + rows, out_f)) for r in range(0, out_f, rows)]


def _rows_flat(weight: Tensor, r0: int, r1: int) -> Tensor:
    """Rows r0:r1 of every expert, [N, (r1-r0) * in] (a view when the experts are contiguous)."""
    return weight[:, r0:r1].reshape(weight.size(0), -1)


def _merge_rows(g: Tensor, weight: Tensor, r0: int, r1: int, out: Tensor) -> Tensor:
    """Rows r0:r1 of the merged weights of a chunk: out [c, (r1-r0)*in] = g [c, N] x those rows
    of every expert. One group on the CPU (batch of one, one sequence): only its selected experts
    are read (the product reads all N; on a GPU the host syncs would cost more than they save)."""
    if g.size(0) == 1 and g.device.type == "cpu":
        sel = g[0].nonzero().flatten().tolist()
        if len(sel) < g.size(1):
            o = out[0]
            if not sel:
                return out.zero_()
            torch.mul(weight[sel[0], r0:r1].reshape(-1), g[0, sel[0]], out=o)
            for i in sel[1:]:
                o.add_(weight[i, r0:r1].reshape(-1), alpha=g[0, i].item())
            return out
    return torch.mm(g, _rows_flat(weight, r0, r1), out=out)


def _whole(x: Tensor, weight: Tensor) -> bool:
    """Small enough to merge all groups' whole weights at once: the same products as the blocked
    path with one chunk and one block, in a few calls (small layers are bound by per-call costs)."""
    return x.size(0) * weight[0].numel() * weight.element_size() <= min(
        _block_bytes(weight), MERGE_CHUNK_BYTES
    )


def _merged_scratch(g: Tensor, weight: Tensor) -> Tensor:
    """Merged weights [G, out, in] of all groups, in the scratch memory (see buffers.scratch)."""
    _, out_f, in_f = weight.shape
    w = scratch(g.size(0) * out_f * in_f, weight.dtype, weight.device).view(g.size(0), -1)
    return _merge_rows(g, weight, 0, out_f, w).view(-1, out_f, in_f)


def _whole_forward(x, g, weight, bias):
    w = _merged_scratch(g, weight)
    if bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(torch.mm(g, bias).unsqueeze(1), x, w.transpose(1, 2))


def _whole_backward(ctx, x, g, weight, bias, dy):
    need_x, need_g, need_w, need_b = ctx.needs_input_grad[:4]
    n = weight.size(0)
    gx = gg = gw = gb = None
    if need_x:
        gx = torch.bmm(dy, _merged_scratch(g, weight))  # (the scratch is free again afterwards)
    db = dy.sum(1) if bias is not None and (need_g or need_b) else None  # [G, out]
    if need_g or need_w:
        dw = scratch(x.size(0) * weight[0].numel(), weight.dtype, weight.device).view(
            x.size(0), weight.size(1), -1
        )
        dw = torch.bmm(dy.transpose(1, 2), x, out=dw).view(x.size(0), -1)  # per-group weight gradient
        if need_g:
            # gg^T [N, G], as the blocked path: this orientation is the faster one on the CPU, and
            # cuBLASLt refuses some half-precision products into a transposed output
            ggt = torch.mm(weight.view(n, -1), dw.t())
            if db is not None:
                ggt.addmm_(bias, db.t())
            gg = ggt.t()
        if need_w:
            gw = torch.mm(g.t(), dw, out=new_grad(ctx.grad_buffer, weight).view(n, -1)).view_as(weight)
    if need_b and bias is not None:
        gb = torch.mm(g.t(), db)
    return gx, gg, gw, gb


class MergedLinearFunction(torch.autograd.Function):
    """y[g] = x[g] (sum_i gates[g,i] W_i)^T + sum_i gates[g,i] b_i, recomputing merges in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor], grad_buffer=None):
        ctx.save_for_backward(x, gates, weight, bias)
        ctx.grad_buffer = grad_buffer
        if _whole(x, weight):
            return _whole_forward(x, gates.to(weight.dtype), weight, bias)
        g_total, t, _ = x.shape
        n, out_f, in_f = weight.shape
        out = x.new_empty(g_total, t, out_f)
        for sl in _chunks(g_total, weight):
            xs, g = x[sl], gates[sl].to(weight.dtype)
            c = g.size(0)
            blocks = _row_blocks(c, weight)
            buf = scratch(c * (blocks[0][1] - blocks[0][0]) * in_f, x.dtype, x.device)
            for r0, r1 in blocks:
                w = _merge_rows(g, weight, r0, r1, buf[: c * (r1 - r0) * in_f].view(c, -1))
                w = w.view(c, r1 - r0, in_f).transpose(1, 2)
                torch.bmm(xs, w, out=out[sl, :, r0:r1])
            buf = w = None  # the scratch is free for the next chunk
            if bias is not None:
                out[sl] += torch.mm(g, bias).unsqueeze(1)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, gates, weight, bias = ctx.saved_tensors
        need_x, need_g, need_w, need_b = ctx.needs_input_grad[:4]
        n, out_f, in_f = weight.shape
        g_total = x.size(0)
        grad_out = grad_out.contiguous()
        if _whole(x, weight):
            gx, gg, gw, gb = _whole_backward(ctx, x, gates.to(weight.dtype), weight, bias, grad_out)
            return gx, (gg.to(gates.dtype) if gg is not None else None), gw, gb, None
        gx = x.new_empty(x.shape) if need_x else None
        ggt = torch.zeros(n, g_total, dtype=weight.dtype, device=gates.device) if need_g else None  # gg^T
        # every row block of the first chunk writes its part of gw; later chunks accumulate
        gw = None
        if need_w:
            gw = (
                new_grad(ctx.grad_buffer, weight).view(n, -1)
                if g_total
                else weight.new_zeros(n, out_f * in_f)
            )
        gb = torch.zeros_like(bias) if (need_b and bias is not None) else None
        for ci, sl in enumerate(_chunks(g_total, weight)):
            xs, dys, g = x[sl], grad_out[sl], gates[sl].to(weight.dtype)
            c = g.size(0)
            blocks = _row_blocks(c, weight)
            # one buffer for a block's merged rows (input gradient), then its weight-gradient rows
            buf = scratch(c * (blocks[0][1] - blocks[0][0]) * in_f, x.dtype, x.device)
            for bi, (r0, r1) in enumerate(blocks):
                w_rows = _rows_flat(weight, r0, r1)  # [N, rows*in]
                dy = dys[:, :, r0:r1]  # [c, T, rows]
                nel = c * (r1 - r0) * in_f
                if need_x:
                    w = _merge_rows(g, weight, r0, r1, buf[:nel].view(c, -1)).view(c, r1 - r0, in_f)
                    if bi == 0:
                        torch.bmm(dy, w, out=gx[sl])
                    else:
                        gx[sl].baddbmm_(dy, w)
                if need_g or need_w:
                    dw = torch.bmm(dy.transpose(1, 2), xs, out=buf[:nel].view(c, r1 - r0, in_f)).view(c, -1)
                    if need_g:
                        ggt[:, sl].addmm_(w_rows, dw.t())
                    if need_w:
                        gw_rows = gw[:, r0 * in_f : r1 * in_f]
                        if ci == 0:
                            torch.mm(g.t(), dw, out=gw_rows)
                        else:
                            gw_rows.addmm_(g.t(), dw)
            buf = w = dw = None  # the scratch is free for the next chunk
            if bias is not None and (need_g or need_b):
                db = dys.sum(1)  # [c, out]
                if need_g:
                    ggt[:, sl].addmm_(bias, db.t())
                if need_b:
                    gb.addmm_(g.t(), db)
        gg = ggt.t().contiguous().to(gates.dtype) if need_g else None
        if gw is not None:
            gw = gw.view_as(weight)
        return gx, gg, gw, gb, None


def merged_linear(
    x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None, grad_buffer=None
) -> Tensor:
    """MEO linear for routing groups.

    Args:
        x: [G, T, in] inputs, grouped so that the T tokens of group g share gates[g]
        gates: [G, N] gates (zeros for unselected experts), any float dtype
        weight: [N, out, in]; bias: [N, out] or None
        grad_buffer: optional :class:`~.buffers.GradBuffer` for the weight's gradient
    Returns:
        [G, T, out]
    """
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return MergedLinearFunction.apply(x, gates, weight, bias, grad_buffer)


def apply_merged(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """Run already merged weights (cached for decoding): x [G, T, in], w [G, out, in], b [G, out]."""
    x = x.to(w.dtype)
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
