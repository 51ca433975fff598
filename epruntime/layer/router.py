"""DeepSeek-V3 gating (``noaux_tc``): group-limited top-k over sigmoid scores, in fp32.

``scoring_func: softmax`` gives DeepSeek-V2-style gating (softmax scores, groups ranked by their
best expert). The correction bias only steers the choice; the weights are the unbiased scores.
``max_nodes_per_token = M`` adds the DeepSeek-V3 report's node-limited routing: before group
selection, each token keeps only the M nodes with the highest sum of their top K/M choice scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from epruntime.config.schema import MoEConfig


def _keep_best_blocks(
    choice: torch.Tensor,  # [T, E]
    num_blocks: int,
    keep: int,
    block_score: Callable[[torch.Tensor], torch.Tensor],  # [T, B, E/B] -> [T, B]
) -> torch.Tensor:  # [T, E]
    """Set every expert outside the ``keep`` best of ``num_blocks`` contiguous blocks to -inf."""
    num_tokens, num_experts = choice.shape
    blocks = choice.view(num_tokens, num_blocks, num_experts // num_blocks)  # [T, B, E/B]
    best = block_score(blocks).topk(keep, dim=-1, sorted=False).indices  # [T, keep]
    mask = torch.zeros(num_tokens, num_blocks, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
    return blocks.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def _sum_of_top_two(blocks: torch.Tensor) -> torch.Tensor:  # [T, B, E/B] -> [T, B]
    """Best plus second best of each block: two max passes, several times faster than topk(2) on CPU."""
    best, where = blocks.max(dim=-1)  # [T, B]
    return best + blocks.scatter(-1, where.unsqueeze(-1), float("-inf")).amax(dim=-1)


def _sum_of_top(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if n == 2:
        return _sum_of_top_two
    return lambda blocks: blocks.topk(n, dim=-1).values.sum(dim=-1)


def route(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E]
    cfg: MoEConfig,
    experts_per_node: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``topk_idx [T, K]`` (int64 global expert ids) and ``topk_weights [T, K]`` (fp32).

    ``experts_per_node`` (the placement's experts per node) is needed only when
    ``cfg.max_nodes_per_token`` is set.
    """
    logits = torch.nn.functional.linear(x.float(), gate_weight.float())  # [T, E]
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    choice = scores + correction_bias.float()  # [T, E]
    k, max_nodes = cfg.num_experts_per_tok, cfg.max_nodes_per_token
    if max_nodes is not None:
        if experts_per_node is None:
            raise ValueError("route: model.max_nodes_per_token is set; pass experts_per_node from the topology")
        num_nodes = cfg.n_routed_experts // experts_per_node
        if max_nodes < num_nodes:
            choice = _keep_best_blocks(choice, num_nodes, max_nodes, _sum_of_top(k // max_nodes))
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        group_score = _sum_of_top(2) if cfg.scoring_func == "sigmoid" else lambda blocks: blocks.amax(dim=-1)
        choice = _keep_best_blocks(choice, cfg.n_group, cfg.topk_group, group_score)
    topk_idx = choice.topk(k, dim=-1, sorted=False).indices  # [T, K]
    topk_weights = scores.gather(1, topk_idx)  # [T, K]
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weights * cfg.routed_scaling_factor


class Router(nn.Module):
    """The gate: a replicated ``[E, H]`` projection plus the ``[E]`` score-correction bias."""

    def __init__(
        self,
        cfg: MoEConfig,
        weight: torch.Tensor,
        correction_bias: torch.Tensor,
        experts_per_node: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.experts_per_node = cfg, experts_per_node
        self.weight = nn.Parameter(weight.float(), requires_grad=False)  # [E, H]
        self.register_buffer("e_score_correction_bias", correction_bias.float())  # [E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [T, H]
        return route(x, self.weight, self.e_score_correction_bias, self.cfg, self.experts_per_node)
