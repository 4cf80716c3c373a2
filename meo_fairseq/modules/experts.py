"""Expert parameters: N linear experts stored stacked, one layout for every mode."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .buffers import GradBuffer


class StackedExperts(nn.Module):
    """``weight`` [N, out, in], ``bias`` [N, out]; with compressed experts also ``scales`` [N, in]
    (per-expert input scaling vectors, initialised to ones). Each expert is initialised as an
    ``nn.Linear`` would be (fairseq's FFN linears are ``nn.Linear``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        bias: bool = True,
        compressed: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.scales = nn.Parameter(torch.ones(num_experts, in_features)) if compressed else None
        self.grad_buffer = GradBuffer()  # memory for weight.grad, reused across steps (buffers.py)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_features)
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight.data[i], a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def dense(self, x: Tensor) -> Tensor:
        """The single expert as a plain linear (dense mode, N == 1)."""
        # squeeze (a view) rather than [0]: indexing's backward writes a zero-filled copy
        return F.linear(x, self.weight.squeeze(0), self.bias.squeeze(0) if self.bias is not None else None)

    def input_scale(self, ce: Optional[Tensor]) -> Optional[Tensor]:
        """Merged compressed-expert scaling vector per group: ce [G, N] -> [G, in] (None if off)."""
        if ce is None or self.scales is None:
            return None
        return ce.to(self.scales.dtype) @ self.scales

    @torch.no_grad()
    def copy_dense_(self, weight: Tensor, bias: Optional[Tensor]):
        """Make every expert a copy of a dense linear (upcycling): weight [out, in], bias [out]."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"upcycling: dense weight has shape {tuple(weight.shape)}, "
                f"experts expect {(self.out_features, self.in_features)}"
            )
        self.weight.copy_(weight.unsqueeze(0).expand_as(self.weight))
        if self.bias is not None:
            if bias is None:
                self.bias.zero_()
            else:
                self.bias.copy_(bias.unsqueeze(0).expand_as(self.bias))
        if self.scales is not None:
            self.scales.fill_(1.0)

    def extra_repr(self):
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


class TokenBlock(nn.Module):
    """Token-level MEO's per-token bottleneck residual: x + Up(ReLU(Down(x))), d -> d/64 -> d.

    Up is zero-initialised, so the block starts as the identity.
    """

    def __init__(self, dim: int, reduction: int = 64):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.reset_identity_()

    @torch.no_grad()
    def reset_identity_(self):
        self.up.weight.zero_()
        self.up.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.relu(self.down(x)))
