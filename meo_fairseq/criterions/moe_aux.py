"""Collects the auxiliary losses and routing statistics of every expert layer of a model.

Every expert layer exposes the last forward's weighted auxiliary loss as ``l_aux`` and its routing
statistics as ``routing_summary`` (None where the layer has no router of its own); this module
walks the model's modules and reads them.

Normalisation: fairseq's criteria return a loss *summed* over the batch and the trainer divides
the gradients by ``sample_size``. Each router's ``aux_loss`` is already a batch average (weighted
by --moe-balance-weight / --moe-z-loss-weight), so it is multiplied by ``sample_size`` before it
is added: after fairseq's division every expert layer contributes exactly its weighted auxiliary
loss, independent of the batch size. The logged ``loss`` stays the task loss (so perplexities are
the model's); ``moe_aux`` is logged beside it. The logged statistics are layer averages per batch
with a ``moe_batches`` count, so logging outputs can be summed across workers (fairseq's fast path).
They are 0-dim tensors, as fairseq's own losses in a logging output: read on the host when fairseq
logs, after the backward, not in the middle of the training step.
"""

import torch
from fairseq import metrics

from ..modules.router import summarize

STATS = ("moe_aux", "moe_balance", "moe_z_loss", "moe_max_frac", "moe_entropy")


def aux_and_stats(model):
    """(sum of the expert layers' weighted aux losses or None, logging dict of layer averages)."""
    losses, summaries = [], []
    for m in model.modules():
        loss = getattr(m, "l_aux", None)
        if loss is None:
            continue
        losses.append(loss)
        summary = getattr(m, "routing_summary", None)
        if summary is not None:
            summaries.append(summary)
    if not losses:
        return None, {}
    total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    if not summaries:
        return total, {}
    # one batch of ops for all routers (they share the number of experts)
    if len({s.numel() for s in summaries}) == 1:
        parts = [summarize(torch.stack(summaries).float())]
    else:
        parts = [summarize(s.float().unsqueeze(0)) for s in summaries]
    cols = ("balance", "z_loss", "max_frac", "entropy")
    vals = torch.stack(
        [
            torch.cat([p["balance"] for p in parts]).sum(),
            torch.cat([p["z_loss"] for p in parts]).sum(),
            torch.cat([p["fraction"].max(1).values for p in parts]).sum(),
            torch.cat([p["entropy"] for p in parts]).sum(),
            total.detach().float(),
        ]
    )  # (a tensor, read at logging time: no wait for the device between forward and backward)
    means = (vals[:-1] / len(summaries)).unbind()
    out = {"moe_aux": vals[-1], **{f"moe_{c}": v for c, v in zip(cols, means)}}
    out["moe_batches"] = 1
    return total, out


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
