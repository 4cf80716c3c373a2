"""Encoder and decoder classes that build expert layers, and the checkpoint checks (shared by
every model of the plugin)."""

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoder,
    TransformerEncoder,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.utils import safe_getattr

from ..modules.config import unused_options
from .moe_args import gate_noise
from .moe_layers import MoETransformerDecoderLayer, MoETransformerEncoderLayer

logger = logging.getLogger(__name__)


def _wrap(layer, cfg):
    """Activation checkpointing and FSDP wrapping, as fairseq's own build_*_layer do."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


class MoETransformerEncoder(TransformerEncoder):
    """fairseq's TransformerEncoder with one MoEConfig per layer (``moe_cfgs``)."""

    def __init__(self, args, dictionary, embed_tokens, moe_cfgs, return_fc=False):
        self._moe_cfgs = list(moe_cfgs)  # consumed by build_encoder_layer during __init__
        super().__init__(args, dictionary, embed_tokens, return_fc=return_fc)

    def build_encoder_layer(self, cfg):
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap(MoETransformerEncoderLayer(cfg, self._moe_cfgs.pop(0), return_fc=self.return_fc), cfg)


class MoETransformerDecoder(TransformerDecoder):
    """fairseq's TransformerDecoder with one MoEConfig per layer (``moe_cfgs``)."""

    def __init__(
        self, args, dictionary, embed_tokens, moe_cfgs, no_encoder_attn=False, output_projection=None
    ):
        self._moe_cfgs = list(moe_cfgs)
        super().__init__(
            args,
            dictionary,
            embed_tokens,
            no_encoder_attn=no_encoder_attn,
            output_projection=output_projection,
        )

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap(MoETransformerDecoderLayer(cfg, self._moe_cfgs.pop(0), no_encoder_attn), cfg)


# ---------------------------------------------------------------------------------------------
# What a checkpoint was trained with: the dictionaries and the --moe-* options
# ---------------------------------------------------------------------------------------------
#
# Every plugin model carries a buffer META_KEY (saved in its checkpoints' "model" state): a JSON
# document, stored as an int64 tensor of its UTF-8 bytes, with a fingerprint of each dictionary
# the model was built with and the --moe-* options that give the weights their meaning. When a
# checkpoint is loaded (fairseq-generate/eval-lm, or fairseq-train resuming), the model compares
# the checkpoint's document with its own (see check_loaded_metadata) before any weight is copied.
# Checkpoints written before this buffer existed load as before (nothing to compare).

META_KEY = "moe_meta"
META_VERSION = 1

# --moe-* options under which the same weights compute another function (or have other shapes)
MEANING_OPTIONS = (
    "moe_mode",
    "moe_level",
    "moe_experts",
    "moe_top_k",
    "moe_freq",
    "moe_expert_unit",
    "moe_decoder_routing",
    "moe_segment_length",
    "moe_prefix_length",
    "moe_compressed_experts",
    # compared only where they apply (token-level MEO; compressed experts): see build_metadata
    "moe_token_block_order",
    "moe_compressed_weighting",
)


@dataclass
class ResumeArgs(FairseqDataclass):
    reset_moe_options: bool = field(
        default=False,
        metadata={
            "help": "when resuming (or --finetune-from-model) from a checkpoint trained with other "
            "--moe-* options (mode, level, experts, top-k, ...), load its weights under the new options "
            "on purpose instead of refusing"
        },
    )


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the data or the options it is loaded with."""


def dictionary_fingerprint(dictionary) -> str:
    """sha256 (first 16 hex digits) of a fairseq Dictionary's symbols, in id order (counts ignored).

    Two dictionaries with the same fingerprint map every token id to the same symbol.
    """
    h = hashlib.sha256()
    for symbol in dictionary.symbols:
        h.update(symbol.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def task_dictionary_files(task) -> Tuple[Optional[str], Optional[str]]:
    """Where ``task``'s source and target dictionaries were read from (None where unknown):
    DATA/dict.SRC.txt and DATA/dict.TGT.txt for translation, DATA/dict.txt for language modeling."""
    cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    data = getattr(cfg, "data", None) if cfg is not None else None
    if not data:
        return None, None
    root = os.path.abspath(str(data).split(os.pathsep)[0])
    src, tgt = getattr(cfg, "source_lang", None), getattr(cfg, "target_lang", None)
    if src and tgt:
        return os.path.join(root, f"dict.{src}.txt"), os.path.join(root, f"dict.{tgt}.txt")
    path = os.path.join(root, "dict.txt")
    return (path, path) if os.path.isfile(path) else (None, None)


def _option_value(args, name):
    value = safe_getattr(args, name, None)
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def build_metadata(
    args,
    task,
    dictionary_files: Optional[Tuple[Optional[str], Optional[str]]] = None,
    defaults: Optional[dict] = None,
    target_role: str = "target",
) -> dict:
    """The document stored in META_KEY for a model built from ``args`` for ``task``.

    Args:
        args: the model's options (Namespace or DictConfig) with the --moe-* options.
        task: a fairseq task with ``source_dictionary`` and ``target_dictionary``.
        dictionary_files: the files the two dictionaries were read from, for the messages
            (default: task_dictionary_files(task)).
        defaults: the values the model uses for options left at None (e.g. the decoder routing),
            so that the default and the same value given explicitly compare equal.
        target_role: the role under which the target dictionary is recorded; only dictionaries of
            the same role are compared (a classifier's ``label`` dictionary is not the masked-LM
            ``target`` dictionary of the checkpoint it is fine-tuned from).
    Returns:
        {"version", "dictionaries": [{"role", "fingerprint", "size", "file"}...], "moe": {option: value}}
    """
    files = dictionary_files or task_dictionary_files(task)
    dicts = []
    for role, d, f in (
        ("source", task.source_dictionary, files[0]),
        (target_role, task.target_dictionary, files[1]),
    ):
        if d is not None:
            dicts.append({"role": role, "fingerprint": dictionary_fingerprint(d), "size": len(d), "file": f})
    moe = {name: _option_value(args, name) for name in MEANING_OPTIONS}
    for name, value in (defaults or {}).items():
        if moe.get(name) is None:
            moe[name] = value
    for name in unused_options(moe["moe_mode"], moe["moe_level"], moe["moe_compressed_experts"]):
        moe["moe_" + name] = None  # (e.g. no token block: its order means nothing)
    # training options that do not change the function, compared on resume with a warning
    training = {"gate_noise": gate_noise(args)}
    return {"version": META_VERSION, "dictionaries": dicts, "moe": moe, "training": training}


def encode_metadata(meta: dict) -> torch.Tensor:
    """JSON of ``meta`` as a 1-d int64 tensor of its UTF-8 bytes (an integer buffer: fp16/bf16
    conversion leaves it alone, and averaging identical checkpoints keeps it)."""
    return torch.tensor(list(json.dumps(meta, sort_keys=True).encode("utf-8")), dtype=torch.int64)


def decode_metadata(tensor: torch.Tensor) -> Optional[dict]:
    """Inverse of encode_metadata (None for a tensor that does not hold such a document)."""
    try:
        meta = json.loads(bytes(int(b) for b in tensor.reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and "dictionaries" in meta else None


def attach_metadata(
    model: torch.nn.Module, args, task, dictionary_files=None, defaults=None, target_role="target"
) -> None:
    """Register the META_KEY buffer on a freshly built model (call at the end of build_model;
    the arguments are build_metadata's)."""
    meta = build_metadata(args, task, dictionary_files, defaults, target_role)
    model.register_buffer(META_KEY, encode_metadata(meta))
    model._reset_moe_options = bool(safe_getattr(args, "reset_moe_options", False))


def _frame_local(functions, local: str):
    """The value of ``local`` in the innermost caller frame running one of ``functions``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in functions and local in frame.f_locals:
            return frame.f_locals[local]
        frame = frame.f_back
    return None


def evaluating() -> bool:
    """True while fairseq builds/loads a model from a trained checkpoint (generate, eval-lm,
    interactive, hub): checkpoint_utils.load_model_ensemble_and_task is on the stack."""
    return _frame_local(("load_model_ensemble_and_task",), "filenames") is not None


def dictionary_errors(saved: dict, own: dict, checkpoint: str) -> List[str]:
    """One message per dictionary of ``own`` whose fingerprint differs from ``saved``'s (two
    metadata documents, see build_metadata); ``checkpoint`` names the checkpoint in them."""
    errors, seen = [], set()
    by_role = {d["role"]: d for d in saved.get("dictionaries", [])}
    for mine in own.get("dictionaries", []):
        theirs = by_role.get(mine["role"])
        if theirs is None or theirs["fingerprint"] == mine["fingerprint"]:
            continue
        now = mine.get("file") or f"the task's {mine['role']} dictionary"
        then = theirs.get("file") or "(file not recorded)"
        if (now, then) in seen:  # a language model's source and target dictionary: one file
            continue
        seen.add((now, then))
        errors.append(
            f"the dictionary {now} ({mine['size']} symbols, fingerprint {mine['fingerprint']}) is not "
            f"the one {checkpoint} was trained with: {then} ({theirs['size']} symbols, fingerprint "
            f"{theirs['fingerprint']})"
        )
    return errors


def check_loaded_metadata(model: torch.nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Compare a checkpoint's META_KEY document with ``model``'s before the weights are loaded.

    Raises CheckpointMismatchError when the dictionaries differ (any load: the token ids would
    mean other words, and every score would be wrong), or when fairseq-train resumes with other
    MEANING_OPTIONS than the checkpoint's, unless --reset-moe-options. Afterwards
    ``state_dict[prefix + META_KEY]`` is the model's own document (so that it loads), and a
    checkpoint without one (written by an older version) loads unchecked.
    """
    own_tensor = getattr(model, META_KEY, None)
    if own_tensor is None:
        return
    key = prefix + META_KEY
    saved_tensor = state_dict.get(key)
    state_dict[key] = own_tensor.detach().clone().cpu()
    if saved_tensor is None:
        logger.info(
            "the checkpoint records no dictionary fingerprint (written by an older version): not checked"
        )
        return
    saved, own = decode_metadata(saved_tensor), decode_metadata(own_tensor)
    if saved is None or own is None:
        return
    checkpoint = _frame_local(("load_model_ensemble_and_task", "load_checkpoint"), "filename")
    checkpoint = f"checkpoint {checkpoint}" if checkpoint else "the checkpoint"
    errors = dictionary_errors(saved, own, checkpoint)
    if errors:
        raise CheckpointMismatchError(
            "dictionary mismatch: "
            + "; ".join(errors)
            + ". Token ids would mean other words and every score "
            "would be wrong: use data binarized with the training dictionary "
            "(fairseq-preprocess --srcdict/--tgtdict "
            "with the file the checkpoint was trained with)"
        )
    if evaluating() or getattr(model, "_reset_moe_options", False):
        return
    if saved.get("moe", {}).get("moe_mode") == own["moe"].get("moe_mode") == "dense":
        return  # no expert layer either way: the other options mean nothing
    _warn_training_changes(saved, own, checkpoint)
    changed = [
        f"--{name.replace('_', '-')} {saved['moe'][name]} (checkpoint) vs {own['moe'][name]} (now)"
        for name in MEANING_OPTIONS
        if name in saved.get("moe", {}) and saved["moe"][name] != own["moe"].get(name)
    ]
    if changed:
        raise CheckpointMismatchError(
            f"resuming from {checkpoint} with other expert options than it was trained with: "
            + ", ".join(changed)
            + ". Its weights would be used under another meaning. Resume with the checkpoint's options, use "
            "another --save-dir for a new run, or add --reset-moe-options to load the weights under the new "
            "options on purpose"
        )


def _warn_training_changes(saved: dict, own: dict, checkpoint: str) -> None:
    """Resuming: warn where the gate noise differs from the checkpoint's training (and for a
    checkpoint written before the default changed to no noise, which does not record it)."""
    noisy = own.get("training", {}).get("gate_noise")
    then = saved.get("training", {}).get("gate_noise")
    if then is None and not noisy:
        logger.warning(
            "%s was written before the default changed to no gate noise and does not record whether it "
            "trained with noise: it did unless it was started with --no-moe-gate-noise. This run trains "
            "without noise; add --moe-gate-noise to continue as before",
            checkpoint,
        )
    elif then is not None and then != noisy:
        logger.warning(
            "%s trained %s gate noise; this run continues %s it (%s)",
            checkpoint,
            "with" if then else "without",
            "with" if noisy else "without",
            "--moe-gate-noise" if noisy else "no --moe-gate-noise",
        )


class MetadataCheckMixin:
    """Mixed into a FairseqModel (before it in the bases): checks META_KEY whenever fairseq loads
    a checkpoint into the model (load_state_dict upgrades the state dict first)."""

    def upgrade_state_dict_named(self, state_dict, name):
        check_loaded_metadata(self, state_dict, f"{name}." if name else "")
        super().upgrade_state_dict_named(state_dict, name)


def check_data_dictionaries(model_state: dict, checkpoint: str, source_file: str, target_file: str) -> None:
    """The eval scripts' check, before fairseq runs: the data's dictionary files against the
    checkpoint's record (or, for a checkpoint without one, against its embedding sizes).

    Args:
        model_state: the checkpoint's "model" state dict.
        checkpoint: the checkpoint's path (for the message).
        source_file, target_file: the data's dictionaries (the same file for a language model).
    Raises:
        CheckpointMismatchError naming both dictionary files (or the file and the sizes).
    """
    from fairseq.data import Dictionary

    loaded = {}
    for _role, path in (("source", source_file), ("target", target_file)):
        if path not in loaded:
            loaded[path] = Dictionary.load(path)
    saved_tensor = model_state.get(META_KEY)
    saved = decode_metadata(saved_tensor) if saved_tensor is not None else None
    if saved is not None:
        own = {"dictionaries": [
            {"role": role, "fingerprint": dictionary_fingerprint(loaded[path]),
             "size": len(loaded[path]), "file": path}
            for role, path in (("source", source_file), ("target", target_file))
        ]}  # fmt: skip
        errors = dictionary_errors(saved, own, f"checkpoint {checkpoint}")
        if errors:
            raise CheckpointMismatchError("dictionary mismatch: " + "; ".join(errors))
        return
    # no record (an older checkpoint): at least the sizes must match the embeddings
    for side, path in (("encoder", source_file), ("decoder", target_file)):
        weight = model_state.get(f"{side}.embed_tokens.weight")
        if weight is not None and weight.size(0) != len(loaded[path]):
            raise CheckpointMismatchError(
                f"dictionary mismatch: {path} has {len(loaded[path])} symbols "
                f"but checkpoint {checkpoint} was trained "
                f"with a dictionary of {weight.size(0)} ({side}.embed_tokens)"
            )
