"""SwiGLU, the activation of every expert (routed and shared): one implementation for the package."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h: torch.Tensor) -> torch.Tensor:  # [..., 2I] gate then up -> [..., I]
    """``silu(gate) * up`` of a fused gate/up projection (one new tensor, multiplied in place)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
