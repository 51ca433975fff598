"""The shared expert: one SwiGLU MLP replicated on every rank (TP1), applied to every token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epruntime.layer.activation import swiglu


class SharedExpert(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one ``[2I_s, H]`` weight."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.intermediate = w2.shape[1]
        self.w13 = nn.Parameter(w13, requires_grad=False)  # [2I_s, H] gate rows then up rows
        self.w2 = nn.Parameter(w2, requires_grad=False)  # [H, I_s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H] -> [T, H]
        """The shared expert's output for every token."""
        return F.linear(swiglu(F.linear(x, self.w13)), self.w2)  # [T, 2I_s] -> [T, I_s] -> [T, H]
