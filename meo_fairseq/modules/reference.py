"""The math of every expert layer, in plain PyTorch with ordinary autograd. Read this file first.

Shapes: ``G`` routing groups (tokens, sequences or segments), ``N`` experts, ``k`` selected experts,
``T`` tokens per group, ``M`` tokens, ``d`` router input width.

1. Router (Shazeer et al. 2017)::

       logits = inp Wg + noise * (softplus(inp Wn) + eps)     # noise only in training
       topk_logits, topk_idx = topk(logits, k)
       topk_gates = softmax(topk_logits)                      # sums to 1 over the k
       gates[g, topk_idx[g, j]] = topk_gates[g, j]            # dense (G, N), zeros elsewhere

   ``inp`` is the pooled layer input of the group (a masked mean, see ``pool``); the auxiliary
   loss balances the experts over the groups (``balance_loss``).

2. MEO (He et al. 2023), for linear experts ``W_i`` (out x in), ``b_i``::

       merged_weight = sum_i gates[g, i] W_i      # one (G, N) x (N, out*in) product
       y[g] = x[g] merged_weight[g]^T + merged_bias[g]

3. Vanilla MoE with the same gates: ``y[m] = sum_j topk_gates[m, j] (x[m] W_{topk_idx[m, j]}^T +
   b_{topk_idx[m, j]})``, computed exactly (no token is dropped) with fixed shapes: the (token,
   expert) pairs are sorted by expert and every expert runs one matmul over its rows
   (``grouped_linear``). For linear experts 2. and 3. are the same function.

Every function here runs without a host-device synchronisation (no ``.item()``, no shapes that
depend on values), so a layer built on it compiles whole with ``torch.compile(fullgraph=True)``.
The fast CPU kernels (``impl="blocked"``: merge.py, dispatch.py, gating.py) compute the same
functions and are tested against this file. Outside ``torch.compile`` the reference path runs two
pieces as single autograd nodes with their backward written out (``FUSED``: ``MergedLinear`` below
and ``gating.NoisyTopKGating``), the same functions in fewer ops.
"""

import logging
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

# Outside torch.compile, run the MEO linear and the router's gating as single autograd nodes whose
# backward is written out (MergedLinear here, gating.NoisyTopKGating): the same functions in fewer
# ops. False: the plain autograd of this file everywhere (the tests compare the two).
FUSED = True

NOISE_EPS = 1e-2  # floor of the noise scale
CV_EPS = 1e-10  # CV^2 = var / (mean^2 + CV_EPS)


class Gates(NamedTuple):
    """The gates of G routing groups (all fp32)."""

    gates: Tensor  # (G, N) gates of the fully computed experts, zeros elsewhere; rows sum to 1
    topk_idx: Tensor  # (G, kf) their experts, kf = k - compressed experts, by decreasing gate
    topk_gates: Tensor  # (G, kf) their gates
    compressed: Optional[Tensor] = None  # (G, N) renormalised gates of the compressed experts


class RouterLoss(NamedTuple):
    aux_loss: Tensor  # () weighted auxiliary loss of the groups with keep = 1
    summary: Tensor  # (N + 2,) no grad: importance (summed gates) per expert, balance, z-loss


# ---- router ------------------------------------------------------------------------------------


def pool(x: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
    """Masked mean over T of x (B, T, d), pad_mask (B, T) True = pad; fp32 (B, d). A sequence
    without real tokens gives zeros."""
    if pad_mask is None:
        return torch.mean(x, 1, dtype=torch.float32)  # (B, d); (no fp32 copy of a half-precision x)
    keep = (~pad_mask).float()  # (B, T)
    w = keep / keep.sum(1, keepdim=True).clamp(min=1.0)  # (B, T)
    return torch.bmm(w.unsqueeze(1), x.float()).squeeze(1)  # (B, d)


def top_k_gates(logits: Tensor, k: int, compressed: int = 0, weighting: str = "renormalised") -> Gates:
    """Top-k of logits (G, N), softmax over the k. With ``compressed`` > 0 the last ``compressed``
    of the k are compressed experts, whose gates are renormalised (a softmax over their own
    logits); the main experts' gates too (``weighting="renormalised"``), or they keep their
    softmax-over-all-N probabilities (``"authors"``, Compressed Experts' code)."""
    topk_logits, topk_idx = logits.topk(k, dim=-1)  # (G, k), descending
    return _gates(topk_logits, topk_idx, logits, compressed, weighting)


def _gates(topk_logits: Tensor, topk_idx: Tensor, logits: Tensor, compressed: int, weighting: str) -> Gates:
    """Gates from the k largest logits (G, k), their experts (G, k) and all logits (G, N)."""
    kf = topk_idx.size(1) - compressed
    n = logits.size(1)
    if compressed and weighting == "authors":
        topk_gates = torch.softmax(logits, dim=-1).gather(1, topk_idx[:, :kf])  # (G, kf)
    else:
        topk_gates = torch.softmax(topk_logits[:, :kf], dim=-1)  # (G, kf)
    zeros = topk_logits.new_zeros(topk_logits.size(0), n)  # (G, N)
    gates = zeros.scatter(1, topk_idx[:, :kf], topk_gates)  # (G, N)
    comp = None
    if compressed:
        comp_gates = torch.softmax(topk_logits[:, kf:], dim=-1)  # (G, compressed)
        comp = zeros.scatter(1, topk_idx[:, kf:], comp_gates)  # (G, N)
    return Gates(gates, topk_idx[:, :kf], topk_gates, comp)


def noisy_top_k(
    inp: Tensor,
    w_gate: Tensor,
    w_noise: Optional[Tensor],
    k: int,
    noise: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    compressed: int = 0,
    weighting: str = "renormalised",
    balance: str = "cv",
    balance_weight: float = 0.01,
    z_weight: float = 0.0,
    aux: bool = True,
    noise_scale: float = 1.0,
) -> Tuple[Gates, Optional[RouterLoss]]:
    """Noisy top-k gating and its auxiliary loss.

    Args:
        inp: (G, d) fp32 router inputs; w_gate, w_noise: (d, N) (w_noise only read with noise)
        k: selected experts, ``compressed`` of them compressed experts (main experts' gates:
            ``weighting``, see top_k_gates)
        noise: (G, N) standard normal noise (training), or None
        keep: (G,) float, 1 where a group counts in the auxiliary loss; None: all
        balance: "cv" (CV^2(importance) + CV^2(load), the load smoothed with noise), "switch", "none"
        balance_weight, z_weight: weights of the balance loss and the z-loss
        aux: False: no loss (decoding)
        noise_scale: multiplies the noise std
    Returns:
        (Gates, RouterLoss or None)
    """
    clean = inp @ w_gate  # (G, N)
    n = clean.size(1)
    logits = clean
    if noise is not None:
        std = F.softplus(inp @ w_noise) + NOISE_EPS  # (G, N)
        if noise_scale != 1.0:
            std = std * noise_scale
        logits = torch.addcmul(clean, noise, std)
    smooth = aux and noise is not None and balance == "cv" and k < n
    top_logits, top_idx = logits.topk(k + int(smooth), dim=-1)  # (G, k [+ 1]), descending
    out = _gates(top_logits[:, :k], top_idx[:, :k], logits, compressed, weighting)
    if not aux:
        return out, None
    selected = out.gates  # (G, N) gates of all k selected experts
    if compressed:
        probs_k = torch.softmax(top_logits[:, :k], -1)  # (G, k)
        selected = logits.new_zeros(logits.shape).scatter(1, top_idx[:, :k], probs_k)
    # groups counted by the switch and z-losses
    count = keep.sum().clamp(min=1.0) if keep is not None else float(clean.size(0))
    zero = clean.new_zeros(()) if (balance != "cv" or n == 1 or z_weight <= 0) else None
    if balance == "cv":
        if smooth:  # smooth load: P(logit_i stays in the top k under new noise), Shazeer et al.
            thr_in, thr_out = top_logits[:, k:], top_logits[:, k - 1 : k]  # (G, 1) (k+1)-th, k-th
            z = (clean - torch.where(logits > thr_in, thr_in, thr_out)) / std  # (G, N)
            load = torch.special.ndtr(z)  # (G, N)
        else:
            load = (selected > 0).float()  # (G, N)
        both = torch.cat([selected, load], 1)  # (G, 2N)
        sums = (keep @ both if keep is not None else both.sum(0)).view(2, n)  # importance, load
        importance = sums[0]
        if n > 1:
            var, mean = torch.var_mean(sums, 1)  # (2,) unbiased variance
            bal = (var / (mean * mean + CV_EPS)).sum()
        else:
            bal = zero
    else:
        importance = keep @ selected if keep is not None else selected.sum(0)  # (N,)
        bal = zero
        if balance == "switch":  # N sum_e f_e P_e (Switch Transformer)
            top1 = F.one_hot(selected.argmax(-1), n).float()  # (G, N)
            fp = torch.cat([top1, torch.softmax(clean, -1)], 1)  # (G, 2N)
            f, p = ((keep @ fp if keep is not None else fp.sum(0)) / count).view(2, n)
            bal = n * (f * p).sum()
    if z_weight > 0:  # router z-loss (ST-MoE): mean of logsumexp(clean)^2
        sq = torch.logsumexp(clean, -1).square()  # (G,)
        zl = (keep @ sq if keep is not None else sq.sum()) / count
        loss = balance_weight * bal + z_weight * zl
    else:
        zl = zero
        loss = balance_weight * bal
    summary = torch.cat([importance, torch.stack([bal, zl])]).detach()  # (N + 2,)
    return out, RouterLoss(loss, summary)


# ---- MEO: merge, then one matmul ---------------------------------------------------------------


def merge_experts(gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    """merged_weight (G, out, in) = sum_i gates[:, i] weight[i]; merged_bias (G, out) or None.

    gates: (G, N) (zeros for unselected experts); weight: (N, out, in); bias: (N, out) or None."""
    n, out_f, in_f = weight.shape
    g = gates.to(weight.dtype)
    merged_weight = (g @ weight.view(n, out_f * in_f)).view(-1, out_f, in_f)  # (G, out, in)
    merged_bias = g @ bias if bias is not None else None  # (G, out)
    return merged_weight, merged_bias


def merged_linear(x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """MEO linear: x (G, T, in), the T tokens of group g sharing gates[g] (G, N) -> (G, T, out)."""
    if FUSED and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return MergedLinear.apply(x.to(weight.dtype), gates, weight, bias)
    merged_weight, merged_bias = merge_experts(gates, weight, bias)
    return apply_merged(x, merged_weight, merged_bias)


class MergedLinear(torch.autograd.Function):
    """merged_linear as one autograd node: the same three products forward, and a backward written
    out in seven (autograd's own takes ten, and keeps the merged weight (G, out, in) alive until
    the backward; this node keeps only its inputs and merges again)."""

    @staticmethod
    def forward(ctx, x: Tensor, gates: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        merged_weight, merged_bias = merge_experts(gates, weight, bias)  # (G, out, in), (G, out)
        ctx.save_for_backward(x, gates, weight, bias)
        return apply_merged(x, merged_weight, merged_bias)  # (G, T, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, gates, weight, bias = ctx.saved_tensors
        n, groups = weight.size(0), gates.size(0)
        g = gates.to(weight.dtype)  # (G, N)
        need_x, need_gates, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_gates = grad_w = grad_b = None
        if need_x:
            merged_weight = (g @ weight.view(n, -1)).view(groups, *weight.shape[1:])  # (G, out, in)
            grad_x = torch.bmm(grad, merged_weight)  # (G, T, in)
            del merged_weight  # freed before grad_mw, as large, is made: one of them at a time
        grad_mw = torch.bmm(grad.transpose(1, 2), x).view(groups, -1)  # (G, out*in)
        grad_mb = grad.sum(1) if bias is not None else None  # (G, out)
        if need_gates:
            grad_gates = grad_mw @ weight.view(n, -1).t()  # (G, N)
            if bias is not None:
                grad_gates = torch.addmm(grad_gates, grad_mb, bias.t())
            grad_gates = grad_gates.to(gates.dtype)
        if need_w:
            grad_w = (g.t() @ grad_mw).view(weight.shape)  # (N, out, in)
        if need_b and bias is not None:
            grad_b = g.t() @ grad_mb  # (N, out)
        return grad_x, grad_gates, grad_w, grad_b


def apply_merged(x: Tensor, merged_weight: Tensor, merged_bias: Optional[Tensor]) -> Tensor:
    """x (G, T, in) with merged_weight (G, out, in), merged_bias (G, out) -> (G, T, out)."""
    x = x.to(merged_weight.dtype)
    if merged_bias is None:
        return torch.bmm(x, merged_weight.transpose(1, 2))
    return torch.baddbmm(merged_bias.unsqueeze(1), x, merged_weight.transpose(1, 2))


# ---- vanilla MoE: run the selected experts, mix ------------------------------------------------


def sort_by_expert(topk_idx: Tensor, n: int):
    """Plan of the (token, expert) pairs of topk_idx (M, k), sorted by expert.

    Returns (order (M*k,) pair indices, token (M*k,) token of each sorted pair, offsets (N,) int32
    end of each expert's rows)."""
    flat = topk_idx.reshape(-1)  # (M*k,)
    order = torch.argsort(flat, stable=True)  # (M*k,)
    counts = torch.zeros(n, dtype=torch.int32, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )  # (N,)
    return (
        order,
        torch.div(order, topk_idx.size(1), rounding_mode="floor"),
        counts.cumsum(0, dtype=torch.int32),
    )


def moe_linear(
    x: Tensor, topk_idx: Tensor, topk_gates: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Vanilla MoE over linear experts: x (M, in), topk_idx/topk_gates (M, k) -> (M, out)."""

    def expert_fn(xs, offsets, expert, token):
        return grouped_linear(xs, weight, bias, offsets, expert)

    return moe_apply(x, topk_idx, topk_gates, expert_fn, weight.size(0), weight.size(1))


def moe_apply(x: Tensor, topk_idx: Tensor, topk_gates: Tensor, expert_fn, n: int, out_dim: int) -> Tensor:
    """y[m] = sum_j topk_gates[m, j] expert_fn_{topk_idx[m, j]}(x[m]) for x (M, in) -> (M, out_dim).

    expert_fn(xs (M*k, in) sorted by expert, offsets (N,) ends of the experts' rows, expert (M*k,)
    the expert of each row, token (M*k,) its token) -> (M*k, out_dim)."""
    order, token, offsets = sort_by_expert(topk_idx, n)
    xs = x.index_select(0, token)  # (M*k, in)
    ys = expert_fn(xs, offsets, topk_idx.reshape(-1).index_select(0, order), token)  # (M*k, out)
    ys = ys * topk_gates.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
    return ys.new_zeros(x.size(0), out_dim).index_add(0, token, ys)  # (M, out)


def grouped_linear(
    xs: Tensor, weight: Tensor, bias: Optional[Tensor], offsets: Tensor, expert: Tensor
) -> Tensor:
    """Rows xs (R, in) sorted by expert (offsets (N,) int32: end of each expert's rows; expert
    (R,) the expert of each row) times their expert: (R, out)."""
    ys = grouped_mm(xs.to(weight.dtype), weight.transpose(1, 2), offsets)  # (R, out)
    if bias is not None:
        ys = ys + bias.index_select(0, expert)
    return ys


# ---- grouped matmul ----------------------------------------------------------------------------


# torch's grouped matmul kernel: public from torch 2.10, torch._grouped_mm before (None: neither)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_REFUSED = set()  # (device type, dtype) that the kernel of this torch refused: the loop serves them


def _grouped_mm_ok(a: Tensor, b: Tensor) -> bool:
    """Shapes and dtypes torch's grouped_mm takes: rows and columns 16-byte aligned; bfloat16 on
    CUDA, fp32/bf16/fp16 on the CPU."""
    if _GROUPED_MM is None or (a.device.type, a.dtype) in _REFUSED:
        return False
    if a.dtype not in (
        (torch.bfloat16,) if a.device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)
    ):
        return False
    size = a.element_size()
    return all(s * size % 16 == 0 for s in (a.size(1), b.size(2)))


def _kernel(a: Tensor, b: Tensor, offsets: Tensor) -> Optional[Tensor]:
    """torch's kernel, or None where this torch refuses the device or dtype (an older torch may
    lack the CPU kernel): said once, and the loop below serves them from then on."""
    try:
        return _GROUPED_MM(a, b, offs=offsets)
    except (RuntimeError, NotImplementedError) as e:
        _REFUSED.add((a.device.type, a.dtype))
        logger.warning(
            "torch's grouped_mm refuses %s %s (%s): one matmul per expert instead", a.device.type, a.dtype, e
        )
        return None


@torch.library.custom_op("meo_fairseq::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """a (R, K) rows sorted by group, b (N, K, P), offsets (N,) -> (R, P): row r times b[its group]."""
    if _grouped_mm_ok(a, b):
        out = _kernel(a, b, offsets)
        if out is not None:
            return out
    # fallback for shapes/dtypes torch's kernel refuses: one matmul per group (reads the offsets)
    out = a.new_empty(a.size(0), b.size(2))
    start = 0
    for e, end in enumerate(offsets.tolist()):
        torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


@_grouped_mm_op.register_fake
def _(a, b, offsets):
    return a.new_empty(a.size(0), b.size(2))


@torch.library.custom_op("meo_fairseq::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(a: Tensor, grad: Tensor, offsets: Tensor, n: int) -> Tensor:
    """(N, K, P): per group, a_rows^T grad_rows (zeros for an empty group)."""
    if _grouped_mm_ok(a, grad.unsqueeze(0)) and a.size(0) * a.element_size() % 16 == 0:
        out = _kernel(a.t(), grad, offsets)
        if out is not None:
            return out
    out = a.new_zeros(n, a.size(1), grad.size(1))
    start = 0
    for e, end in enumerate(offsets.tolist()):
        torch.mm(a[start:end].t(), grad[start:end], out=out[e])
        start = end
    return out


@_grouped_mm_wgrad.register_fake
def _(a, grad, offsets, n):
    return a.new_empty(n, a.size(1), grad.size(1))


def _grouped_mm_backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    ga = _grouped_mm_op(grad, b.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    # per group grad_rows^T a_rows (N, P, K), seen as (N, K, P): b is usually a transposed weight
    # (N, P, K), whose gradient is then laid out as the weight (no copy when autograd accumulates it)
    gb = _grouped_mm_wgrad(grad, a, offsets, b.size(0)).transpose(1, 2) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offsets = inputs
    ctx.save_for_backward(a, b, offsets)


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """a (R, K) rows sorted by group, b (N, K, P), offsets (N,) int32 ends -> (R, P), with gradients.

    One kernel (torch's grouped_mm) where torch has it for these shapes and dtype, else a loop over
    the groups inside the op (then it reads the offsets on the host)."""
    return _grouped_mm_op(a, b, offsets)


__all__ = [
    "Gates",
    "RouterLoss",
    "pool",
    "top_k_gates",
    "noisy_top_k",
    "merge_experts",
    "merged_linear",
    "MergedLinear",
    "apply_merged",
    "sort_by_expert",
    "moe_linear",
    "moe_apply",
    "grouped_linear",
    "grouped_mm",
    "NOISE_EPS",
    "FUSED",
]
