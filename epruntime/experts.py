"""This rank's routed experts: permute (row, k) pairs to expert order, grouped GEMM, weighted reduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


def has_grouped_mm() -> bool:
    """Whether this torch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


def grouped_linear(
    x: torch.Tensor,  # [N, D_in] rows in expert-contiguous order
    w: torch.Tensor,  # [E, D_out, D_in] one weight per expert (nn.Linear layout)
    counts: torch.Tensor,  # [E] int64 rows per expert
    use_grouped_mm: bool,
) -> torch.Tensor:  # [N, D_out]
    """Per-expert ``x_e @ w_e.T`` over consecutive row blocks; one kernel when grouped_mm is used."""
    if use_grouped_mm:
        offs = torch.cumsum(counts, dim=0).to(torch.int32)  # [E] end offset of each expert's rows
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start : start + n], w[e].t(), out=out[start : start + n])
        start += n
    return out


class LocalExperts(nn.Module):
    """The ``E_local`` SwiGLU experts this rank owns, stored stacked for grouped GEMM."""

    def __init__(self, cfg: MoEConfig, w13: torch.Tensor, w2: torch.Tensor, grouped_gemm: str = "auto") -> None:
        super().__init__()
        self.intermediate = cfg.moe_intermediate_size
        self.w13 = nn.Parameter(w13, requires_grad=False)  # [E_local, 2I, H] gate rows then up rows
        self.w2 = nn.Parameter(w2, requires_grad=False)  # [E_local, H, I]
        self.use_grouped_mm = grouped_gemm == "grouped_mm" or (grouped_gemm == "auto" and has_grouped_mm())

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def forward(
        self,
        recv_x: torch.Tensor,  # [R, H]
        recv_topk_idx: torch.Tensor,  # [R, K] local ids, -1 elsewhere
        recv_topk_weights: torch.Tensor,  # [R, K] fp32
        tokens_per_expert: torch.Tensor,  # [E_local]
    ) -> torch.Tensor:  # [R, H] weighted sum of this rank's experts per received row
        num_rows, k = recv_topk_idx.shape
        flat_idx = recv_topk_idx.reshape(-1)  # [R*K]
        # Pairs pointing elsewhere (-1) sort last under key E_local and are cut off.
        keys = torch.where(flat_idx >= 0, flat_idx, self.num_experts)
        num_pairs = int(tokens_per_expert.sum())
        pair = torch.argsort(keys, stable=True)[:num_pairs]  # [N] (row, k) pairs in expert order
        rows = torch.div(pair, k, rounding_mode="floor")  # [N]
        h = grouped_linear(recv_x[rows], self.w13, tokens_per_expert, self.use_grouped_mm)  # [N, 2I]
        gate, up = h.split(self.intermediate, dim=1)
        out = grouped_linear(F.silu(gate) * up, self.w2, tokens_per_expert, self.use_grouped_mm)  # [N, H]
        weighted = out.float() * recv_topk_weights.reshape(-1)[pair].unsqueeze(1)  # [N, H] fp32
        y = torch.zeros(num_rows, out.shape[1], dtype=torch.float32, device=out.device)  # [R, H]
        y.index_add_(0, rows, weighted)
        return y.to(recv_x.dtype)
