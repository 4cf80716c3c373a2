"""Collects the auxiliary losses and routing statistics of every router of a model.

Normalisation: fairseq's criteria return a loss *summed* over the batch and the trainer divides
the gradients by ``sample_size``. Each router's ``aux_loss`` is already a batch average (weighted
by --moe-balance-weight / --moe-z-loss-weight), so it is multiplied by ``sample_size`` before it
is added: after fairseq's division every expert layer contributes exactly its weighted auxiliary
loss, independent of the batch size. The logged ``loss`` stays the task loss (so perplexities are
the model's); ``moe_aux`` is logged beside it. The logged statistics are layer averages per batch
with a ``moe_batches`` count, so logging outputs can be summed across workers (fairseq's fast path).
"""

import math

import torch
from fairseq import metrics

from ..modules import Router

STATS = ("moe_aux", "moe_balance", "moe_z_loss", "moe_max_frac", "moe_entropy")


def aux_and_stats(model):
    """(sum of the routers' weighted aux losses or None, logging dict of layer averages)."""
    total, n = None, 0
    balance = z = maxf = ent = 0.0
    for m in model.modules():
        if not isinstance(m, Router) or m.aux_loss is None:
            continue
        total = m.aux_loss if total is None else total + m.aux_loss
        if m.stats:
            n += 1
            balance += float(m.stats["balance"])
            z += float(m.stats["z_loss"])
            maxf += float(m.stats["fraction"].max())
            ent += float(m.stats["entropy"])
    if n == 0:
        return total, {}
    return total, {
        "moe_aux": float(total.detach()),
        "moe_balance": balance / n,
        "moe_z_loss": z / n,
        "moe_max_frac": maxf / n,
        "moe_entropy": ent / n,
        "moe_batches": 1,
    }


def add_aux(loss, model, sample_size, logging_output):
    aux, stats = aux_and_stats(model)
    logging_output.update(stats)
    if aux is None:
        return loss
    return loss + aux.to(loss.dtype) * sample_size


def reduce_aux(logging_outputs):
    batches = sum(log.get("moe_batches", 0) for log in logging_outputs)
    if not batches:
        return
    for key in STATS:
        value = sum(log.get(key, 0.0) for log in logging_outputs) / batches
        metrics.log_scalar(key, value, batches, round=4)
