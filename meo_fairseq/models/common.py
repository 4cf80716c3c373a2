"""Encoder and decoder classes that build expert layers (shared by both models)."""

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from .moe_layers import MoETransformerDecoderLayer, MoETransformerEncoderLayer


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

    def __init__(self, args, dictionary, embed_tokens, moe_cfgs, no_encoder_attn=False, output_projection=None):
        self._moe_cfgs = list(moe_cfgs)
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection)

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(cfg)
        return _wrap(MoETransformerDecoderLayer(cfg, self._moe_cfgs.pop(0), no_encoder_attn), cfg)
