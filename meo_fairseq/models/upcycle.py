"""Upcycling: initialise an expert model from a dense fairseq checkpoint.

Every tensor of the dense model is copied by name; each dense FFN (``<layer>.fc1.weight`` ...
in fairseq's transformer, ``<layer>.fc1.fc1.experts.weight`` [1, ...] in this plugin's dense
mode) becomes N copies in the expert FFN, routers start at zero, token blocks as the identity
and compressed-expert scales at one: before any update the model computes the dense function.
"""

import inspect
import logging
import os

import torch
from fairseq import checkpoint_utils

from .moe_layers import FairseqMoEFFN

logger = logging.getLogger(__name__)


def _dense_ffn(dense: dict, prefix: str, i: int):
    """Weight and bias of fc{i} of the dense layer at ``prefix`` (e.g. 'encoder.layers.0.')."""
    plain = f"{prefix}fc{i}."
    plugin = f"{prefix}fc1.fc{i}.experts."
    if plain + "weight" in dense:
        return dense[plain + "weight"], dense.get(plain + "bias")
    if plugin + "weight" in dense:
        w = dense[plugin + "weight"]
        b = dense.get(plugin + "bias")
        if w.size(0) != 1:
            raise ValueError(f"--moe-upcycle-from: {plugin}weight has {w.size(0)} experts; upcycling needs a dense model")
        return w[0], (b[0] if b is not None else None)
    raise ValueError(f"--moe-upcycle-from: the checkpoint has no FFN weights for {prefix.rstrip('.')} ({plain}weight)")


def _is_embedding(key: str) -> bool:
    return key.endswith("embed_tokens.weight") or key.endswith("output_projection.weight")


def loading_trained_checkpoint() -> bool:
    """True while fairseq builds a model to load a trained checkpoint into (generate, eval-lm):
    then the trained weights replace the initialisation and the dense file is not needed."""
    return any(f.function == "load_model_ensemble_and_task" for f in inspect.stack(context=0))


@torch.no_grad()
def upcycle_from_checkpoint(model: torch.nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--moe-upcycle-from: no checkpoint at {path!r}")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    dense = state["model"]
    ffn_prefixes = {name[: -len("fc1")]: m for name, m in model.named_modules() if isinstance(m, FairseqMoEFFN)}
    own = model.state_dict()
    copied, skipped = 0, []
    for key, tensor in own.items():
        if any(key.startswith(p + "fc1.") for p in ffn_prefixes):
            continue
        if key not in dense:
            skipped.append(key)
            continue
        src = dense[key]
        if _is_embedding(key) and src.dim() == 2 and src.size(0) == tensor.size(0) + 1 and src.size(1) == tensor.size(1):
            # as fairseq's BART loader: bart.* checkpoints have one more row (<mask>) than the
            # GPT-2 dictionary they are fine-tuned with
            logger.warning("upcycling: %s has one more row in %s (<mask>); dropping the last row", key, path)
            src = src[:-1]
        if tuple(src.shape) != tuple(tensor.shape):
            if _is_embedding(key) and src.dim() == 2 and src.size(1) == tensor.size(1):
                hint = (
                    f"the dictionaries differ ({src.size(0)} entries in the checkpoint, {tensor.size(0)} in "
                    "this data): binarize the data with the dense model's dictionary "
                    "(fairseq-preprocess --srcdict/--tgtdict)"
                )
            else:
                hint = "use the architecture sized like the dense checkpoint"
            raise ValueError(
                f"--moe-upcycle-from: {key} has shape {tuple(src.shape)} in {path} but {tuple(tensor.shape)} "
                f"in this model: {hint}"
            )
        tensor.copy_(src)
        copied += 1
    for prefix, ffn in ffn_prefixes.items():
        w1, b1 = _dense_ffn(dense, prefix, 1)
        w2, b2 = _dense_ffn(dense, prefix, 2)
        try:
            ffn.upcycle_(w1, b1, w2, b2)
        except ValueError as e:
            raise ValueError(f"--moe-upcycle-from: {prefix}fc1/fc2: {e}") from None
    if skipped:
        logger.warning("upcycling: %d tensors not in %s keep their initialisation: %s", len(skipped), path, ", ".join(skipped[:8]))
    logger.info("upcycled %d expert FFNs and copied %d tensors from %s", len(ffn_prefixes), copied, path)
