"""``meo_roberta``: fairseq's RoBERTa (masked-LM head, classification heads) with expert FFNs.

The encoder is fairseq's ``TransformerEncoder`` as RoBERTa builds it, with every FFN (or every
``--moe-freq``-th) an expert FFN that takes the ``--moe-*`` options. Encoder layers route per
sequence on the masked mean over the real tokens of each input (a sentence pair, as
``sentence_prediction`` concatenates it, is one sequence); ``--moe-mode meo --moe-level token``
is the paper's token-level MEO, ``--moe-mode moe --moe-level token`` vanilla token-level top-k.

Architectures: ``meo_roberta_tiny`` (2 layers, 64-dim, for tests), ``meo_roberta`` /
``meo_roberta_base``, ``meo_roberta_large``, ``meo_roberta_prenorm``: every other default is that
of fairseq's ``roberta`` / ``roberta_base`` / ``roberta_large`` / ``roberta_prenorm``.

Upcycling (``--moe-upcycle-from``) takes a dense fairseq ``roberta`` checkpoint (one saved by
fairseq-train with ``--arch roberta*``, or the released ``roberta.base/model.pt`` layout with
``decoder.*`` keys): the state dict is upgraded as fairseq upgrades it when it loads the
checkpoint into RoBERTa, embeddings and the LM head are copied, each dense FFN becomes N copies,
and classification heads in the checkpoint are copied when the task registers a head of the same
name and shape. Before any update the model computes the dense model's function.
"""

import logging
import os
from typing import Dict

import torch
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import (
    RobertaEncoder,
    RobertaModel,
    base_architecture,
    roberta_base_architecture,
    roberta_large_architecture,
    roberta_prenorm_architecture,
)
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr, safe_hasattr

from ..modules.experts import StackedExperts, TokenBlock
from .common import MetadataCheckMixin, MoETransformerEncoder, ResumeArgs
from .init import MoEInitArgs, finish_build
from .moe_args import MoEArgs, add_gate_noise_alias, layer_configs

logger = logging.getLogger(__name__)

HEADS = "classification_heads."


@torch.no_grad()
def init_expert_params(module: torch.nn.Module) -> None:
    """BERT's initialisation for expert layers (``init_bert_params`` only knows ``nn.Linear``).

    Every expert weight ~ N(0, 0.02) and bias 0, as BERT initialises a dense FFN linear; the
    token block's Up back to zero (the block starts as the identity). Routers keep their zeros.
    """
    if isinstance(module, StackedExperts):
        module.weight.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, TokenBlock):
        module.reset_identity_()


class MEORobertaEncoder(RobertaEncoder):
    """fairseq's RobertaEncoder whose sentence encoder has expert FFNs (one MoEConfig per layer)."""

    def __init__(self, args, dictionary, moe_cfgs):
        self._moe_cfgs = list(moe_cfgs)  # consumed by build_encoder during __init__
        super().__init__(args, dictionary)

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = MoETransformerEncoder(args, dictionary, embed_tokens, self._moe_cfgs)
        encoder.apply(init_bert_params)
        encoder.apply(init_expert_params)
        return encoder


def _dictionary_files(task):
    """The files of the task's source and target dictionaries: DATA/dict.txt for masked_lm,
    DATA/input0/dict.txt and DATA/label/dict.txt for sentence_prediction (None where absent)."""
    cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    data = getattr(cfg, "data", None) if cfg is not None else None
    if not data:
        return None
    root = os.path.abspath(str(data).split(os.pathsep)[0])
    source = os.path.join(root, "input0", "dict.txt")
    if not os.path.isfile(source):
        return None  # masked_lm: DATA/dict.txt (the default of attach_metadata)
    label = os.path.join(root, "label", "dict.txt")
    return source, label if os.path.isfile(label) else None


@register_model("meo_roberta")
class MEORobertaModel(MetadataCheckMixin, RobertaModel):
    def __init__(self, args, encoder):
        super().__init__(args, encoder)  # applies init_bert_params to the whole model
        self.apply(init_expert_params)
        # classification heads of the dense checkpoint, copied when the task registers them
        self._upcycled_heads: Dict[str, Dict[str, torch.Tensor]] = {}

    @classmethod
    def hub_models(cls):
        return {}  # no released expert checkpoints: upcycle roberta.base / roberta.large instead

    @classmethod
    def add_args(cls, parser):
        RobertaModel.add_args(parser)
        gen_parser_from_dataclass(parser, MoEArgs())
        gen_parser_from_dataclass(parser, MoEInitArgs())
        gen_parser_from_dataclass(parser, ResumeArgs())
        add_gate_noise_alias(parser)

    @classmethod
    def build_model(cls, args, task):
        # RobertaModel.build_model hard-codes RobertaEncoder: the same steps with the expert encoder.
        # The --moe-* options are read here (TransformerConfig drops them from a DictConfig).
        from omegaconf import OmegaConf

        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        base_architecture(args)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        if float(safe_getattr(args, "ffn_reg_scale_factor", 0.0) or 0.0) != 0.0:
            raise ValueError(
                "--ffn-reg-scale-factor is not supported by meo_roberta (it reads dense FFN weights)"
            )
        if safe_getattr(args, "ffn_blocks_to_remove", -1) not in (-1, None):
            raise ValueError("--ffn-blocks-to-remove is not supported by meo_roberta")
        if args.encoder_layers_to_keep:
            args.encoder_layers = len(args.encoder_layers_to_keep.split(","))
        moe_cfgs = layer_configs(args, "encoder", args.encoder_layers)
        encoder = MEORobertaEncoder(args, task.source_dictionary, moe_cfgs)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        model = cls(args, encoder)
        files = _dictionary_files(task)
        # sentence_prediction's target dictionary holds the labels: recorded as "label", so that a
        # classifier fine-tuned from a masked-LM checkpoint compares only the token dictionary
        return finish_build(
            model,
            args,
            task,
            upgrade=model._upgrade_dense_state,
            dictionary_files=files,
            target_role="label" if files else "target",
        )

    def _upgrade_dense_state(self, dense: dict) -> dict:
        """A dense RoBERTa state dict in this model's key layout (as fairseq loads it into RoBERTa);
        its classification heads are kept aside for register_classification_head."""
        dense = dict(dense)
        heads: Dict[str, Dict[str, torch.Tensor]] = {}
        for k in [k for k in dense if k.startswith(HEADS)]:
            name, rest = k[len(HEADS) :].split(".", 1)
            heads.setdefault(name, {})[rest] = dense.pop(k)
        self.upgrade_state_dict_named(dense, "")
        for k in [k for k in dense if k.startswith(HEADS)]:  # the upgrade adds this model's heads
            del dense[k]
        self._upcycled_heads = heads
        if heads:
            logger.info(
                "upcycling: classification heads %s are copied if registered", ", ".join(sorted(heads))
            )
        return dense

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes=num_classes, inner_dim=inner_dim, **kwargs)
        saved = self._upcycled_heads.get(name)
        if saved is None:
            return
        head = self.classification_heads[name].state_dict()
        if set(saved) != set(head) or any(tuple(saved[k].shape) != tuple(v.shape) for k, v in head.items()):
            logger.warning(
                "upcycling: classification head %r differs in shape from the checkpoint's: not copied", name
            )
            return
        self.classification_heads[name].load_state_dict(saved)
        logger.info("upcycling: copied classification head %r", name)


@register_model_architecture("meo_roberta", "meo_roberta")
def meo_roberta(args):
    base_architecture(args)


@register_model_architecture("meo_roberta", "meo_roberta_base")
def meo_roberta_base(args):
    roberta_base_architecture(args)


@register_model_architecture("meo_roberta", "meo_roberta_large")
def meo_roberta_large(args):
    roberta_large_architecture(args)


@register_model_architecture("meo_roberta", "meo_roberta_prenorm")
def meo_roberta_prenorm(args):
    roberta_prenorm_architecture(args)


@register_model_architecture("meo_roberta", "meo_roberta_tiny")
def meo_roberta_tiny(args):
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 256)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    # everything else: the defaults of fairseq's `roberta`, so that a `roberta` with these sizes
    # upcycles into it
    base_architecture(args)
