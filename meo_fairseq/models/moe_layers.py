"""fairseq transformer layers whose FFN is a :class:`~meo_fairseq.modules.MoEFFN`.

fairseq's layer runs ``fc2(dropout(act(fc1(x))))`` inline. Here ``fc1`` is the whole expert FFN
(activation and activation dropout inside, so that an expert can be a whole FFN), ``fc2``, the
layer's activation and activation dropout are identities. The layer hands the routing inputs
(padding mask, encoder context, incremental state) to the FFN before calling fairseq's forward.
"""

from typing import Optional

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase
from torch import Tensor

from ..modules import MoEConfig, MoEFFN, masked_mean, reorder_state


def _identity(x):
    return x


class _RoutingInputs:
    """What the layer hands its FFN before each call (see FairseqMoEFFN.set_routing_inputs)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = (None, None, None)

    def __deepcopy__(self, memo):  # (inputs of one call, never copied with the module)
        return _RoutingInputs()


def _ffn_forward(ffn: MoEFFN, x: Tensor, pad_mask: Optional[Tensor], context: Optional[Tensor]) -> Tensor:
    return MoEFFN.forward(ffn, x, pad_mask, context)


_compiled_ffn_forward = None


def compiled_ffn_forward():
    """``_ffn_forward`` under torch.compile (--moe-compile), built once and shared by every layer:
    the layers of one configuration share their graphs."""
    global _compiled_ffn_forward
    if _compiled_ffn_forward is None:
        _compiled_ffn_forward = torch.compile(_ffn_forward)
    return _compiled_ffn_forward


@with_incremental_state
class FairseqMoEFFN(MoEFFN):
    """MoEFFN on fairseq's time-major tensors: forward(x [T, B, C]) -> [T, B, C]."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a plain holder: nn.Module's setattr, twice per call, is a measurable share of a decoding step
        self._inputs = _RoutingInputs()

    def set_routing_inputs(
        self, pad_mask: Optional[Tensor] = None, context: Optional[Tensor] = None, incremental_state=None
    ):
        """pad_mask [B, T] (True = pad) or None; context [B, C_enc] or None; fairseq's incremental state."""
        self._inputs.value = (pad_mask, context, incremental_state)

    def forward(self, x: Tensor) -> Tensor:
        pad_mask, context, incremental_state = self._inputs.value
        self._inputs.value = (None, None, None)
        state = None
        if incremental_state is not None:
            saved = self.get_incremental_state(incremental_state, "moe")
            if saved is None:  # (the layers update the state dict in place: stored once)
                saved = {"state": {}}
                self.set_incremental_state(incremental_state, "moe", saved)
            state = saved["state"]
            saved["rows"] = x.size(1)
        if state is None and self.cfg.compile and self.cfg.mode != "dense":  # --moe-compile
            return compiled_ffn_forward()(self, x.transpose(0, 1), pad_mask, context).transpose(0, 1)
        y = MoEFFN.forward(self, x.transpose(0, 1), pad_mask, context, state)
        return y.transpose(0, 1)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        saved = self.get_incremental_state(incremental_state, "moe")
        if saved is None:
            return
        n = new_order.numel()
        # greedy decoding reorders by the identity at every step: nothing to do (CPU only: on a GPU
        # the check would sync)
        if (
            saved.get("rows") == n
            and new_order.device.type == "cpu"
            and torch.equal(new_order, torch.arange(n, dtype=new_order.dtype))
        ):
            return
        self.set_incremental_state(
            incremental_state, "moe", {"state": reorder_state(saved["state"], new_order), "rows": n}
        )


class _MoELayerMixin:
    """build_fc1/build_fc2 hooks shared by the encoder and decoder layers."""

    moe_cfg: MoEConfig
    router_dim: Optional[int]

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        if q_noise:
            raise ValueError("--quant-noise-pq is not supported on expert layers")
        return FairseqMoEFFN(
            input_dim,
            output_dim,
            self.moe_cfg,
            activation_fn=self.activation_fn,
            activation_dropout=self.activation_dropout_module,
            router_dim=self.router_dim,
        )

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return nn.Identity()

    def _finish_init(self, cfg):
        if utils.safe_getattr(cfg, "scale_fc", False):
            raise ValueError("--scale-fc is not supported with expert FFNs")
        # the expert FFN applies the activation and its dropout itself
        self.activation_fn = _identity
        self.activation_dropout_module = nn.Identity()


class MoETransformerEncoderLayer(_MoELayerMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, moe_cfg: MoEConfig, return_fc=False):
        self.moe_cfg, self.router_dim = moe_cfg, None
        super().__init__(cfg, return_fc)
        self._finish_init(cfg)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        """x: [T, B, C]; encoder_padding_mask: [B, T] or None (no pads in the batch)."""
        self.fc1.set_routing_inputs(encoder_padding_mask)
        return super().forward(x, encoder_padding_mask, attn_mask)


class MoETransformerDecoderLayer(_MoELayerMixin, TransformerDecoderLayerBase):
    def __init__(
        self, cfg, moe_cfg: MoEConfig, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False
    ):
        self.moe_cfg = moe_cfg
        self.router_dim = cfg.encoder.embed_dim if moe_cfg.routing == "encoder" else None
        super().__init__(cfg, no_encoder_attn, add_bias_kv, add_zero_attn)
        self._finish_init(cfg)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state=None,
        *args,
        **kwargs,
    ):
        """x: [T, B, C]; encoder_out: [S, B, C_enc]; encoder_padding_mask: [B, S] or None."""
        pad = kwargs.get("self_attn_padding_mask")
        if pad is not None and tuple(pad.shape) != (x.size(1), x.size(0)):
            pad = pad[:, -x.size(0) :]
        context = None
        if self.moe_cfg.mode != "dense" and self.moe_cfg.routing == "encoder":
            cached = (
                incremental_state is not None
                and self.fc1.get_incremental_state(incremental_state, "moe") is not None
            )
            if encoder_out is None and not cached:
                raise ValueError("--moe-decoder-routing encoder needs an encoder output")
            if not cached:  # after the first decoding step the gates (and merges) are cached
                context = masked_mean(encoder_out.transpose(0, 1), encoder_padding_mask)
        self.fc1.set_routing_inputs(pad, context, incremental_state)
        return super().forward(x, encoder_out, encoder_padding_mask, incremental_state, *args, **kwargs)
