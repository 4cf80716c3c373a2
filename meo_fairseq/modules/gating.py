"""Noisy top-k gating with its auxiliary loss as one autograd node (the router's training path).

The same function as the step-by-step router code (``Router.route`` with ``fused=False``, kept as
the reference): logits ``clean = x Wg``; in training with noise ``std = softplus(x Wn) + eps``
and ``logits = clean + noise * std``; top-k of the logits, softmax over the k; and the auxiliary
loss over the groups with ``keep`` = 1:

* ``cv``: CV^2(importance) + CV^2(load) (Shazeer et al. 2017), importance the summed gates, load
  the smooth estimate ``P(logit_i in top-k)`` with noise (else the selection counts);
* ``z`` (weight > 0): mean of logsumexp(clean)^2 (ST-MoE).

Why a custom function: at small widths a router is a few dozen tiny ops whose autograd graph
costs more than their arithmetic (op counts: ``python -m meo_fairseq.benchmark layers``).
Forward and backward here are written out in a few vectorised ops; the backward is the exact
derivative of the reference (gradient through the top-k thresholds of the load estimate
included), checked against autograd in tests/test_modules_gating.py. The switch loss and
compressed experts take the step-by-step path; ``impl="reference"`` uses reference.py instead.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import losses
from .reference import CV_EPS, NOISE_EPS  # the same constants as the reference

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class NoisyTopKGating(torch.autograd.Function):
    """(gates [G, N], w [G, k], idx [G, k], aux scalar, stats [N + 2]) from router inputs [G, d].

    gates are the dense gates (zeros off the top-k), w the same k values; both are differentiable
    (merging uses gates, compute-then-mix uses w). stats (no gradient): the importance [N], then
    the balance loss and the z-loss.

    The backward takes two shortcuts, both exact: the softmax over the top k is backpropagated as
    a softmax over all N of the dense gates (zeros contribute nothing), and of the gradient of
    CV^2(importance) only the part that differs between experts is added (the softmax removes a
    part constant over the experts of a group).
    """

    @staticmethod
    def forward(
        ctx,
        inp,
        w_gate,
        w_noise,
        noise,
        keep,
        k: int,
        balance: str,
        balance_weight: float,
        z_weight: float,
        contiguous: bool = False,
        noise_scale: float = 1.0,
    ):
        g_rows, n = inp.size(0), w_gate.size(1)
        clean = inp @ w_gate
        noisy = noise is not None
        if noisy:
            raw = inp @ w_noise
            std = F.softplus(raw).add_(NOISE_EPS)
            if noise_scale != 1.0:
                std.mul_(noise_scale)
            logits = torch.addcmul(clean, noise, std)
        else:
            raw = std = None
            logits = clean
        smooth = noisy and balance == "cv" and k < n
        top_v, top_i = logits.topk(k + int(smooth), dim=-1)
        w = torch.softmax(top_v[:, :k], dim=-1)
        idx = top_i[:, :k]
        gates = logits.new_zeros(g_rows, n).scatter_(1, idx, w)
        imp = keep @ gates if keep is not None else gates.sum(0)
        saved = {}
        aux = bal = zl = None
        if balance == "cv" and n > 1:
            if smooth:
                thr_in, thr_out = top_v[:, k : k + 1], top_v[:, k - 1 : k]
                is_in = logits > thr_in
                z = (clean - torch.where(is_in, thr_in, thr_out)).div_(std)
                load_p = torch.special.ndtr(z)
                load = keep @ load_p if keep is not None else load_p.sum(0)
                saved.update(z=z, is_in=is_in)
            elif keep is not None:
                load = keep @ (gates > 0).to(gates.dtype)
            else:
                load = torch.count_nonzero(gates, 0)  # (int64: stack promotes it)
            sums = torch.stack([imp, load])  # [2, N]
            var, mu = torch.var_mean(sums, 1, keepdim=True)  # (unbiased)
            den = mu.square().add_(CV_EPS)
            cv2 = var / den  # [2, 1]
            bal = cv2.sum()
            aux = bal * balance_weight
            saved.update(sums=sums, den=den, mu=mu, cv2=cv2)
        count = None
        if z_weight > 0:
            count = (keep.sum() if keep is not None else clean.new_tensor(float(g_rows))).clamp(min=1.0)
            lse = torch.logsumexp(clean, dim=-1)  # [G]
            sq = lse * lse
            zl = (keep @ sq if keep is not None else sq.sum()) / count
            aux = z_weight * zl if aux is None else aux + z_weight * zl
            saved.update(lse=lse, clean=clean)
        ctx.k, ctx.bw, ctx.zw, ctx.smooth, ctx.noisy, ctx.contiguous = (
            k,
            balance_weight,
            z_weight,
            smooth,
            noisy,
            contiguous,
        )
        ctx.noise_scale = noise_scale
        ctx.saved = saved
        ctx.save_for_backward(
            inp, w_gate, w_noise if noisy else None, noise, keep, gates, raw, std, top_i, count
        )
        # stats: importance, balance, z-loss (zero for a loss not computed)
        fill = lambda t: t.view(1) if t is not None else imp.new_zeros(1)  # noqa: E731
        stats = torch.cat([imp, fill(bal), fill(zl)]).detach()
        if aux is None:
            aux = clean.new_zeros(())
        ctx.mark_non_differentiable(idx, stats)
        ctx.set_materialize_grads(False)  # (unused outputs' gradients arrive as None, not zeros)
        return gates, w, idx, aux, stats

    @staticmethod
    @once_differentiable  # (no double backward: a clear error instead of a silently wrong graph)
    def backward(ctx, g_gates, g_w, _g_idx, g_aux, _g_stats):
        inp, w_gate, w_noise, noise, keep, gates, raw, std, top_i, count = ctx.saved_tensors
        k, s = ctx.k, ctx.saved
        g_rows, n = gates.shape
        kw = keep.unsqueeze(1) if keep is not None else None
        idx = top_i[:, :k]
        if g_gates is None:
            g_gates = gates.new_zeros(g_rows, n)
        if g_w is not None:  # w = gates at idx
            g_gates = g_gates.scatter_add(1, idx, g_w)
        g_clean = None
        if g_aux is not None and "sums" in s:
            sums, den = s["sums"], s["den"]
            # d CV^2(importance) / d importance_i = 2 importance_i / ((n-1) den) + (the same for
            # every i: dropped)
            d_imp = sums[0] * g_aux  # [N]
            if kw is not None:
                d_imp = kw * d_imp  # [G, N]
            g_gates = torch.addcdiv(g_gates, d_imp, den[0], value=2.0 * ctx.bw / (n - 1))
        # through the softmax over the top k (the dense gates are that softmax, zeros elsewhere)
        g_logits = torch._softmax_backward_data(g_gates, gates, 1, gates.dtype)
        if ctx.smooth and g_aux is not None:  # (noisy CV loss)
            sums, den, mu, cv2 = s["sums"][1], s["den"][1], s["mu"][1], s["cv2"][1]
            # d CV^2(load) / d load = 2 / ((n-1) den) * (load - mu - (n-1)/n CV^2 mu)
            d_load = torch.addcmul(sums - mu, cv2, mu, value=-(n - 1) / n)
            d_load = d_load * (g_aux * (2.0 * ctx.bw / (n - 1)) / den)  # [N]
            z, is_in = s["z"], s["is_in"]
            d_p = d_load.unsqueeze(0) if kw is None else kw * d_load  # dAux/dP [G, N]
            d_z = torch.exp(z.square().mul_(-0.5)).mul_(d_p * _INV_SQRT_2PI).div_(std)  # dAux/d(numerator)
            g_clean = d_z
            # the thresholds are the (k+1)-th and k-th noisy logits: each takes minus the sum of
            # d_z over the experts measured against it
            d_in = (d_z * is_in).sum(1, keepdim=True)
            d_out = d_in - d_z.sum(1, keepdim=True)
            g_logits.scatter_add_(1, top_i[:, k - 1 : k + 1], torch.cat([d_out, d_in.neg_()], 1))
        if ctx.zw > 0 and g_aux is not None:
            d_lse = (g_aux * ctx.zw * 2.0) * s["lse"] / count
            if keep is not None:
                d_lse = d_lse * keep
            dz = torch.softmax(s["clean"], dim=-1) * d_lse.unsqueeze(1)
            g_clean = dz if g_clean is None else g_clean + dz
        g_clean = g_logits if g_clean is None else g_clean + g_logits
        g_raw = None
        if ctx.noisy:
            g_std = g_logits * noise
            if ctx.smooth and g_aux is not None:
                g_std.addcmul_(d_z, s["z"], value=-1.0)
            # softplus' = sigmoid (beyond softplus's threshold of 20 the slope is 1, and so is the
            # fp32 sigmoid there)
            g_raw = g_std * torch.sigmoid(raw)
            if ctx.noise_scale != 1.0:
                g_raw.mul_(ctx.noise_scale)
        need_inp, need_wg, need_wn = ctx.needs_input_grad[:3]
        g_inp = g_wg = g_wn = None
        if need_inp:
            g_inp = g_clean @ w_gate.t()
            if g_raw is not None:
                g_inp = g_inp.addmm_(g_raw, w_noise.t())
        # contiguous: inp^T g, laid out as the weight (no copy when autograd accumulates it);
        # else (g^T inp)^T: with many routed tokens the faster product on the CPU (a transposed
        # [tokens, d] operand)
        wgrad = (lambda g: inp.t() @ g) if ctx.contiguous else (lambda g: (g.t() @ inp).t())  # noqa: E731
        if need_wg:
            g_wg = wgrad(g_clean)
        if need_wn and g_raw is not None:
            g_wn = wgrad(g_raw)
        return g_inp, g_wg, g_wn, None, None, None, None, None, None, None, None


def noisy_top_k_gating(
    inp: Tensor,
    w_gate: Tensor,
    w_noise: Optional[Tensor],
    noise: Optional[Tensor],
    keep: Optional[Tensor],
    k: int,
    balance: str,
    balance_weight: float,
    z_weight: float,
    contiguous: bool = False,
    noise_scale: float = 1.0,
):
    """See :class:`NoisyTopKGating`; inp [G, d] fp32, noise [G, N] standard normal or None
    (no noise), keep [G] float (1 = counts in the auxiliary loss) or None (all); contiguous: the
    weight gradients laid out as the weights (the reference path); noise_scale multiplies the
    noise std."""
    return NoisyTopKGating.apply(
        inp, w_gate, w_noise, noise, keep, k, balance, balance_weight, z_weight, contiguous, noise_scale
    )


# ---- the blocked path's router (Router.route with impl="blocked") ---------------------------------


def route_blocked(router, inp: Tensor, aux_mask: Optional[Tensor], aux: bool, noisy: bool):
    """Router.route on the blocked path: the fused node where it applies (cv/none balance loss, no
    compressed experts), else the step-by-step reference below (Router.fused = False forces it).
    inp (G, d) fp32. Returns (gates (G, N), topk_idx, topk_gates (G, kf), compressed or None)."""
    if fused_applies(router, aux) and (aux_mask is None or bool(aux_mask.any())):
        return route_fused(router, inp, aux_mask, noisy)
    clean = inp @ router.w_gate.float()
    logits = clean
    if noisy:
        std = (F.softplus(inp @ router.w_noise.float()) + NOISE_EPS) * router.cfg.gate_noise_scale
        logits = clean + torch.randn_like(clean) * std
    # the smooth load estimate needs the (k+1)-th noisy logit too: one top-k for both
    smooth = aux and noisy and router.cfg.balance_loss == "cv" and router.cfg.top_k < router.num_experts
    gk, ik, top_v, top = _select(router, logits, int(smooth))
    if not aux:
        return _split(router, gk, ik, top_v, logits=logits)
    selected = gk.new_zeros(gk.size(0), router.num_experts).scatter(1, ik, gk)  # [G, N], all k
    load = _prob_in_top_k(clean, logits, std, top) if smooth else None
    _aux(router, clean, selected, load, aux_mask)
    return _split(router, gk, ik, top_v, selected, logits)


def _select(router, logits: Tensor, extra: int = 0):
    """Top-k of logits [G, N] -> (gates over the k [G, k], indices [G, k], the k logits [G, k],
    the top k + extra logits [G, k + extra]), sorted descending (one top-k for both)."""
    k = router.cfg.top_k
    top_v, top_i = logits.topk(k + extra, dim=-1)
    if extra:
        top_v, top_i, top = top_v[:, :k], top_i[:, :k], top_v
    else:
        top = top_v
    return torch.softmax(top_v, dim=-1), top_i, top_v, top


def _split(router, gk: Tensor, ik: Tensor, top_v: Tensor, selected: Optional[Tensor] = None, logits=None):
    """Split the top-k into full and compressed experts; dense gates [G, N] of each part.
    ``selected``: the dense gates [G, N] of all k (reused when every expert is full); ``logits``
    [G, N]: all logits (the authors' weighting of the main experts)."""
    n, kf = router.num_experts, router.cfg.full_experts
    w, idx = gk[:, :kf], ik[:, :kf]
    ce = None
    if router.cfg.compressed_experts:
        # Renormalised gates of each part, as a softmax over that part's own logits (the same
        # values as gk[part] / gk[part].sum(), but without 0/0 = NaN when the compressed
        # gates underflow to zero for large logit gaps).
        if router.cfg.compressed_weighting == "authors":  # softmax over all N, not renormalised
            w = torch.softmax(logits, dim=-1).gather(1, idx)
        else:
            w = torch.softmax(top_v[:, :kf], dim=-1)
        wc = torch.softmax(top_v[:, kf:], dim=-1)
        ce = gk.new_zeros(gk.size(0), n).scatter(1, ik[:, kf:], wc)
    elif selected is not None:
        return selected, idx, w, ce
    gates = gk.new_zeros(gk.size(0), n).scatter(1, idx, w)
    return gates, idx, w, ce


def fused_applies(router, aux: bool) -> bool:
    """Whether route_fused computes this router's gating: training with the cv or no balance loss,
    no compressed experts (Router.fused = False turns it off)."""
    cfg = router.cfg
    return aux and router.fused and not cfg.compressed_experts and cfg.balance_loss in ("cv", "none")


def route_fused(router, inp: Tensor, aux_mask: Optional[Tensor], noisy: bool):
    """route() with the gating and its auxiliary loss as one autograd node (no host sync)."""
    cfg, n = router.cfg, router.num_experts
    noise = (
        torch.randn(inp.size(0), n, dtype=inp.dtype, device=inp.device) if noisy else None
    )  # (as randn_like(clean))
    keep = aux_mask.float() if aux_mask is not None else None
    gates, w, idx, router.aux_loss, st = noisy_top_k_gating(
        inp,
        router.w_gate.float(),
        router.w_noise.float() if noisy else None,  # (a cast is an op: only when read)
        noise,
        keep,
        cfg.top_k,
        cfg.balance_loss,
        cfg.balance_weight,
        cfg.z_loss_weight,
        router.reference,
        cfg.gate_noise_scale,
    )
    router.summary = st
    return gates, idx, w, None


def _aux(router, clean: Tensor, gates: Tensor, load: Optional[Tensor], aux_mask: Optional[Tensor]):
    """Auxiliary loss and statistics from the clean logits [G, N], the gates of all k selected
    experts [G, N] and (noisy training, CV loss) the smooth load estimate [G, N], over the
    groups where aux_mask [G] is True. The CV loss only sums over groups, so masked groups
    are zeroed instead of indexed out (fewer ops); the switch and z-losses index them out."""
    cfg = router.cfg
    zero = clean.new_zeros(())
    if gates.size(0) == 0 or (aux_mask is not None and not bool(aux_mask.any())):
        router.aux_loss = zero
        router.summary = None
        return
    keep = None if aux_mask is None else aux_mask.to(gates.dtype).unsqueeze(1)  # [G, 1]
    real = (lambda t: t) if aux_mask is None else (lambda t: t[aux_mask])  # noqa: E731
    if keep is not None:
        gates = gates * keep
    if cfg.balance_loss == "cv":
        if load is None:
            load = (gates > 0).to(gates.dtype)  # (masked groups are already zero)
        elif keep is not None:
            load = load * keep
        balance = losses.cv_loss(gates, load.sum(0))
    elif cfg.balance_loss == "switch":
        balance = losses.switch_loss(real(clean), real(gates))
    else:
        balance = zero
    zl = losses.z_loss(real(clean)) if cfg.z_loss_weight > 0 else zero
    router.aux_loss = cfg.balance_weight * balance + cfg.z_loss_weight * zl
    with torch.no_grad():
        router.summary = torch.cat([gates.sum(0), torch.stack([balance, zl])])


def _prob_in_top_k(clean: Tensor, noisy: Tensor, std: Tensor, top: Tensor) -> Tensor:
    """Smooth load estimate of noisy top-k gating (Shazeer et al. 2017, appendix A): [G, N].

    top: the k + 1 largest noisy logits [G, k + 1], sorted descending."""
    k = top.size(1) - 1
    thr_in = top[:, k : k + 1]
    thr_out = top[:, k - 1 : k]
    # standard normal CDF (torch.distributions.Normal validates its arguments at every call)
    p_in = torch.special.ndtr((clean - thr_in) / std)
    p_out = torch.special.ndtr((clean - thr_out) / std)
    return torch.where(noisy > thr_in, p_in, p_out)
