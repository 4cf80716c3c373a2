"""Upcycling: initialise an expert model from a dense fairseq checkpoint.

Every tensor of the dense model is copied by name; each dense FFN (``<layer>.fc1.weight`` ...
in fairseq's transformer, ``<layer>.fc1.fc1.experts.weight`` [1, ...] in this plugin's dense
mode) becomes N copies in the expert FFN, routers start at zero, token blocks as the identity
and compressed-expert scales at one: before any update the model computes the dense function.
"""

import glob
import inspect
import logging
import os
import pickle
import sys
from typing import Optional

import torch
from fairseq import checkpoint_utils

from .common import META_KEY
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
            raise ValueError(
                f"--moe-upcycle-from: {plugin}weight has {w.size(0)} experts; upcycling needs a dense model"
            )
        return w[0], (b[0] if b is not None else None)
    raise ValueError(
        f"--moe-upcycle-from: the checkpoint has no FFN weights for {prefix.rstrip('.')} ({plain}weight)"
    )


def _is_embedding(key: str) -> bool:
    return key.endswith("embed_tokens.weight") or key.endswith("output_projection.weight")


def loading_trained_checkpoint() -> bool:
    """True while fairseq builds a model to load a trained checkpoint into (generate, eval-lm):
    then the trained weights replace the initialisation and the dense file is not needed."""
    return any(f.function == "load_model_ensemble_and_task" for f in inspect.stack(context=0))


def resume_checkpoint() -> Optional[str]:
    """The checkpoint fairseq-train is about to restore the model from, if any (None when the
    run starts from scratch or this is not fairseq-train).

    fairseq builds the model before it loads a checkpoint; this follows the rule of fairseq's
    checkpoint_utils.load_checkpoint: SAVE_DIR/checkpoint_last.pt if it exists (else
    --finetune-from-model or --continue-once), or a non-default --restore-file.
    """
    frame, cfg = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_code.co_filename.endswith(
            os.path.join("fairseq_cli", "train.py")
        ):
            cfg = frame.f_locals.get("cfg")
            break
        frame = frame.f_back
    ck = getattr(cfg, "checkpoint", None)
    if ck is None:
        return None
    suffix = getattr(ck, "checkpoint_suffix", "") or ""
    if ck.restore_file == "checkpoint_last.pt":
        last = os.path.join(ck.save_dir, f"checkpoint_last{suffix}.pt")
        candidates = [last, getattr(ck, "continue_once", None), getattr(ck, "finetune_from_model", None)]
        if glob.glob(os.path.join(glob.escape(ck.save_dir), f"checkpoint_last{suffix}-shard*.pt")):
            return last
    else:
        candidates = [ck.restore_file.replace(".pt", suffix + ".pt") if suffix else ck.restore_file]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def load_dense_checkpoint(path: str) -> dict:
    """The model state of the dense checkpoint ``path``; errors name --moe-upcycle-from and the file."""
    expected = "expected a checkpoint written by fairseq-train (a dict with the weights under 'model')"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--moe-upcycle-from: no checkpoint at {path!r}")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:
        try:  # what is it, then?
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:
            if isinstance(e2, (KeyError, pickle.UnpicklingError, EOFError)):
                reason = "not a file written by torch.save"
            else:  # e.g. a truncated file: torch's zip reader error, first sentence
                reason = f"{type(e2).__name__}: {str(e2).strip().split('. ')[0]}"
        else:
            if isinstance(raw, dict) and not isinstance(raw.get("model"), dict):
                reason = (
                    f"a dict without 'model' (a bare state_dict?), "
                    f"keys {', '.join(map(str, list(raw)[:4]))}..."
                )
            else:
                reason = f"{type(e).__name__}: {e}"
        raise ValueError(
            f"--moe-upcycle-from {path}: cannot read it as a fairseq checkpoint ({reason}); {expected}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"--moe-upcycle-from {path}: no 'model' weights in it; {expected}")
    return state["model"]


@torch.no_grad()
def upcycle_from_checkpoint(model: torch.nn.Module, path: str, upgrade=None) -> None:
    """Copy the dense checkpoint ``path`` into ``model`` (see the module docstring); nothing
    is read when fairseq-train will restore the model from a checkpoint of its own.
    ``upgrade``: optional callable, dense state dict -> state dict in the model's key layout.

    Raises:
        FileNotFoundError / ValueError: naming --moe-upcycle-from and the file.
    """
    restored = resume_checkpoint()
    if restored is not None:
        logger.info(
            "--moe-upcycle-from %s not read: fairseq-train restores the model from %s", path, restored
        )
        return
    dense = load_dense_checkpoint(path)
    if upgrade is not None:
        dense = upgrade(dense)
    ffn_prefixes = {
        name[: -len("fc1")]: m for name, m in model.named_modules() if isinstance(m, FairseqMoEFFN)
    }
    own = model.state_dict()
    copied, skipped = 0, []
    for key, tensor in own.items():
        if key.endswith(META_KEY):
            continue
        if any(key.startswith(p + "fc1.") for p in ffn_prefixes):
            continue
        if key not in dense:
            skipped.append(key)
            continue
        src = dense[key]
        if (
            _is_embedding(key)
            and src.dim() == 2
            and src.size(0) == tensor.size(0) + 1
            and src.size(1) == tensor.size(1)
        ):
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
        logger.warning(
            "upcycling: %d tensors not in %s keep their initialisation: %s",
            len(skipped),
            path,
            ", ".join(skipped[:8]),
        )
    logger.info("upcycled %d expert FFNs and copied %d tensors from %s", len(ffn_prefixes), copied, path)
