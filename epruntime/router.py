"""DeepSeek-V3 gating (``noaux_tc``): group-limited top-k over sigmoid scores, in fp32.

``scoring_func: softmax`` gives DeepSeek-V2-style gating (softmax scores, groups ranked by their
best expert). The correction bias only steers the choice; the weights are the unbiased scores.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig


def route(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E]
    cfg: MoEConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``topk_idx [T, K]`` (int64 global expert ids) and ``topk_weights [T, K]`` (fp32)."""
    num_tokens = x.shape[0]
    logits = torch.nn.functional.linear(x.float(), gate_weight.float())  # [T, E]
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    choice = scores + correction_bias.float()  # [T, E]
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.view(num_tokens, cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # [T, G, E/G]
        if cfg.scoring_func == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.amax(dim=-1)  # [T, G]
        keep = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(num_tokens, cfg.n_routed_experts)
    topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices  # [T, K]
    topk_weights = scores.gather(1, topk_idx)  # [T, K]
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weights * cfg.routed_scaling_factor


class Router(nn.Module):
    """The gate: a replicated ``[E, H]`` projection plus the ``[E]`` score-correction bias."""

    def __init__(self, cfg: MoEConfig, weight: torch.Tensor, correction_bias: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(weight.float(), requires_grad=False)  # [E, H]
        self.register_buffer("e_score_correction_bias", correction_bias.float())  # [E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [T, H]
        return route(x, self.weight, self.e_score_correction_bias, self.cfg)
