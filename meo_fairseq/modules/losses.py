"""Auxiliary routing losses. Pure functions on router outputs of the *real* routing groups only.

Shapes: ``G`` routing groups (tokens or sequences/segments), ``N`` experts.
"""

import torch
from torch import Tensor


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 (unbiased var, as Shazeer et al.).

    0 for a single value. For ``N`` values with all mass ``M`` on one of them it is ``N``.
    """
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def cv_loss(gates: Tensor, load: Tensor) -> Tensor:
    """The authors' balance loss CV^2(importance) + CV^2(load).

    gates: [G, N] gate values (zeros for unselected experts); load: [N] (smooth) selection counts.
    """
    return cv_squared(gates.sum(0)) + cv_squared(load)


def switch_loss(logits: Tensor, gates: Tensor) -> Tensor:
    """Switch Transformer loss N * sum_e f_e P_e.

    f_e: fraction of groups whose top choice (largest gate) is e; P_e: mean router probability
    (softmax over all N logits). 1 for uniform routing, N when every group picks one expert with
    all its probability.
    """
    n = logits.size(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    top1 = gates.argmax(dim=-1)
    f = torch.bincount(top1, minlength=n).to(probs.dtype) / max(top1.numel(), 1)
    return n * (f * probs.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over groups of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
