"""``meo_transformer``: fairseq's encoder-decoder transformer with expert FFNs.

Architectures: ``meo_transformer_tiny`` (2+2 layers, 64-dim, for tests), ``meo_transformer``
(fairseq's ``transformer`` sizes), ``meo_bart_base`` / ``meo_bart_large`` (fairseq's
``bart_base`` / ``bart_large`` sizes and layout, so that BART checkpoints can be upcycled).
"""

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.bart.model import bart_base_architecture, bart_large_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture
from fairseq.utils import safe_getattr

from .common import (
    MetadataCheckMixin,
    MoETransformerDecoder,
    MoETransformerEncoder,
    ResumeArgs,
)
from .init import MoEInitArgs, finish_build
from .moe_args import MoEArgs, add_gate_noise_alias, layer_configs


@register_model("meo_transformer")
class MEOTransformerModel(MetadataCheckMixin, TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MoEArgs())
        gen_parser_from_dataclass(parser, ResumeArgs())
        gen_parser_from_dataclass(parser, MoEInitArgs())
        add_gate_noise_alias(parser)

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        return finish_build(model, args, task, defaults={"moe_decoder_routing": "encoder"})

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return MoETransformerEncoder(
            args, src_dict, embed_tokens, layer_configs(args, "encoder", args.encoder_layers)
        )

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return MoETransformerDecoder(
            args,
            tgt_dict,
            embed_tokens,
            layer_configs(args, "decoder", args.decoder_layers),
            no_encoder_attn=safe_getattr(args, "no_cross_attention", False),
        )


@register_model_architecture("meo_transformer", "meo_transformer")
def meo_transformer(args):
    base_architecture(args)


@register_model_architecture("meo_transformer", "meo_transformer_tiny")
def meo_transformer_tiny(args):
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 256)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    base_architecture(args)


@register_model_architecture("meo_transformer", "meo_bart_base")
def meo_bart_base(args):
    bart_base_architecture(args)


@register_model_architecture("meo_transformer", "meo_bart_large")
def meo_bart_large(args):
    bart_large_architecture(args)
