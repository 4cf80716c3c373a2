"""``meo_transformer_lm``: fairseq's decoder-only transformer language model with expert FFNs.

Architectures: ``meo_transformer_lm_tiny`` (2 layers, 64-dim, for tests), ``meo_transformer_lm``
(fairseq's ``transformer_lm`` defaults), ``meo_transformer_lm_gpt2_small``,
``meo_transformer_lm_gpt2_medium`` (fairseq's GPT-2 sizes).
"""

import logging
from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    transformer_lm_gpt2_medium,
    transformer_lm_gpt2_small,
)
from fairseq.tasks.language_modeling import LanguageModelingTask
from fairseq.utils import safe_getattr

from .common import (
    MetadataCheckMixin,
    MoETransformerDecoder,
    ResumeArgs,
)
from .init import MoEInitArgs, finish_build
from .moe_args import MoEArgs, add_gate_noise_alias, layer_configs

logger = logging.getLogger(__name__)


@dataclass
class MEOTransformerLMConfig(TransformerLanguageModelConfig, MoEArgs, MoEInitArgs, ResumeArgs):
    pass


@register_model("meo_transformer_lm", dataclass=MEOTransformerLMConfig)
class MEOTransformerLanguageModel(MetadataCheckMixin, TransformerLanguageModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_gate_noise_alias(parser)

    @classmethod
    def build_model(cls, args, task):
        # TransformerLanguageModel.build_model hard-codes its decoder, so this builds its own.
        # The --moe-* options are read here (TransformerConfig drops them from a DictConfig).
        moe_cfgs = layer_configs(args, "decoder", args.decoder_layers, is_lm=True)
        for flag in ("character_embeddings", "adaptive_input", "adaptive_softmax_cutoff"):
            if safe_getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is not supported by meo_transformer_lm")
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        _warn_if_never_routed(moe_cfgs, safe_getattr(args, "tokens_per_sample", None))
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = MoETransformerDecoder(
            args, task.target_dictionary, embed_tokens, moe_cfgs, no_encoder_attn=True
        )
        model = cls(decoder)
        task.meo_lm_positions = args.max_target_positions  # read by the eval-lm check below
        return finish_build(model, args, task, defaults={"moe_decoder_routing": "segment"})


def _warn_if_never_routed(moe_cfgs, tokens_per_sample):
    """Segment/prefix routing with samples no longer than one segment/prefix routes nothing."""
    cfg = next((c for c in moe_cfgs if c.mode != "dense"), None)
    if cfg is None or not tokens_per_sample:
        return
    length = {"segment": cfg.segment_length, "prefix": cfg.prefix_length}.get(cfg.routing)
    if length is not None and tokens_per_sample <= length:
        logger.warning(
            "--moe-decoder-routing %s with --moe-%s-length %d >= --tokens-per-sample %d: every position "
            "uses the learned default gate and the routers never route",
            cfg.routing,
            cfg.routing,
            length,
            tokens_per_sample,
        )


_fairseq_eval_lm_dataloader = LanguageModelingTask.eval_lm_dataloader


def _eval_lm_dataloader(self, dataset, *args, max_positions=None, context_window=0, **kwargs):
    """fairseq-eval-lm's data loader, failing loudly where fairseq would skip blocks in silence.

    fairseq-eval-lm cuts the data into blocks of ``--tokens-per-sample`` (fairseq's default: 1024)
    and skips every block longer than the model's positions with one WARNING. For a plugin LM
    (``self.meo_lm_positions`` set by ``build_model``) a block that is longer, context window
    included, than the positions it was trained with raises an error that names the flag instead.
    """
    limit = getattr(self, "meo_lm_positions", None)
    if limit is not None and max_positions is not None and len(dataset) > 0:
        longest = int(max(dataset.sizes)) + context_window  # context tokens precede each block
        if longest > min(limit, max_positions):
            tokens = self.args.tokens_per_sample + context_window  # eval-lm subtracted the window
            long_blocks = int(sum(int(s) + context_window > min(limit, max_positions) for s in dataset.sizes))
            raise ValueError(
                f"--tokens-per-sample {tokens}: {long_blocks} of {len(dataset)} blocks "
                f"(context window included) are longer than the {min(limit, max_positions)} positions the "
                f"model was trained with, and fairseq would skip them; pass --tokens-per-sample "
                f"{min(limit, max_positions)} (its training value; with --context-window, the window is "
                f"part of those tokens)"
            )
    return _fairseq_eval_lm_dataloader(
        self, dataset, *args, max_positions=max_positions, context_window=context_window, **kwargs
    )


LanguageModelingTask.eval_lm_dataloader = _eval_lm_dataloader


@register_model_architecture("meo_transformer_lm", "meo_transformer_lm_tiny")
def meo_transformer_lm_tiny(args):
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_input_dim = safe_getattr(args, "decoder_input_dim", args.decoder_embed_dim)
    args.decoder_output_dim = safe_getattr(args, "decoder_output_dim", args.decoder_embed_dim)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    # everything else: the defaults of fairseq's `transformer_lm` (post-LN), so that a
    # `transformer_lm` with these sizes upcycles into it


@register_model_architecture("meo_transformer_lm", "meo_transformer_lm_gpt2_small")
def meo_transformer_lm_gpt2_small(args):
    transformer_lm_gpt2_small(args)


@register_model_architecture("meo_transformer_lm", "meo_transformer_lm_gpt2_medium")
def meo_transformer_lm_gpt2_medium(args):
    transformer_lm_gpt2_medium(args)
