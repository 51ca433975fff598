"""Single-process reference MoE layer written from the math of DESIGN.md, sharing no code with what it checks.

Everything runs in fp32 in one process: no dispatch, no grouped GEMM, and its own routing
(:func:`reference_route`), re-derived with sort-based selection rather than imported from
:mod:`epruntime.layer.router`, so that tests comparing the layer with this reference see router
bugs too. The experts are a loop over experts, each on the tokens that picked it, with the plain formula
``down(silu(gate(x)) * up(x))``. It imports torch, the config and the weight accessors only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epruntime.config.schema import MoEConfig
from epruntime.io.weights import StateDict, gate_weights, take


def _keep_best_blocks(choice: torch.Tensor, block_size: int, keep: int, top: int) -> torch.Tensor:  # [T, E]
    """Rank the contiguous blocks of ``block_size`` experts of each token by the sum of their ``top`` best choice
    scores; the experts of every block ranked ``keep`` or lower become -inf."""
    blocks = choice.unflatten(1, (-1, block_size))  # [T, B, S]
    block_score = blocks.sort(dim=2, descending=True).values[:, :, :top].sum(dim=2)  # [T, B]
    order = block_score.argsort(dim=1, descending=True, stable=True)  # [T, B] best block first
    position = order.argsort(dim=1)  # [T, B] each block's place in that order
    kept = (position < keep).repeat_interleave(block_size, dim=1)  # [T, E]
    return torch.where(kept, choice, float("-inf"))


def reference_route(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E]
    cfg: MoEConfig,
    experts_per_node: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, K] int64 expert ids, [T, K] fp32 weights
    """DeepSeek-V3 routing from the math: sigmoid (or softmax) scores in fp32; choice = scores + bias; with
    ``max_nodes_per_token = M`` keep the M nodes (``experts_per_node`` contiguous experts) with the best sum of
    their top K/M choices; keep the ``topk_group`` groups with the best sum of their top-2 choices (softmax: their
    best); top-K of choice; weights = the unbiased scores there, normalised when ``norm_topk_prob``, scaled."""
    k = cfg.num_experts_per_tok
    logits = F.linear(x.float(), gate_weight.float())  # [T, E]
    scores = torch.sigmoid(logits) if cfg.scoring_func == "sigmoid" else torch.softmax(logits, dim=1)  # [T, E]
    choice = scores + correction_bias.float()  # [T, E]
    if cfg.max_nodes_per_token is not None:
        if experts_per_node is None:
            raise ValueError("reference_route: model.max_nodes_per_token is set; pass experts_per_node")
        choice = _keep_best_blocks(choice, experts_per_node, cfg.max_nodes_per_token, k // cfg.max_nodes_per_token)
    group_top = 2 if cfg.scoring_func == "sigmoid" else 1
    choice = _keep_best_blocks(choice, cfg.n_routed_experts // cfg.n_group, cfg.topk_group, group_top)
    topk_idx = choice.argsort(dim=1, descending=True, stable=True)[:, :k]  # [T, K]
    topk_weights = torch.take_along_dim(scores, topk_idx, dim=1)  # [T, K]
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=1, keepdim=True) + 1e-20)
    return topk_idx, topk_weights * cfg.routed_scaling_factor


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)  # [T, H] -> [T, I] -> [T, H]


def _expert(sd: StateDict, cfg: MoEConfig, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    if "experts.gate_up_proj" in sd:
        gate, up = sd["experts.gate_up_proj"][e].split(i)
        return gate, up, sd["experts.down_proj"][e]
    return (
        take(sd, f"experts.{e}.gate_proj.weight", (i, h)),
        take(sd, f"experts.{e}.up_proj.weight", (i, h)),
        take(sd, f"experts.{e}.down_proj.weight", (h, i)),
    )


@torch.no_grad()
def reference_moe(x: torch.Tensor, sd: StateDict, cfg: MoEConfig, experts_per_node: int | None = None) -> torch.Tensor:
    """``y = sum_k w_k Expert_{idx_k}(x) + Shared(x)`` for all tokens ``x [T, H]``, computed in fp32.

    ``sd`` holds dense weights; ``experts_per_node`` is the placement's, needed only for node-limited routing.
    """
    xf = x.float()  # [T, H]
    topk_idx, topk_weights = reference_route(xf, *gate_weights(sd, cfg), cfg, experts_per_node)  # [T, K], [T, K]
    y = torch.zeros_like(xf)  # [T, H]
    for e in torch.unique(topk_idx).tolist():
        token, slot = (topk_idx == e).nonzero(as_tuple=True)  # [T_e] each: a token picks an expert at most once
        gate, up, down = (w.float() for w in _expert(sd, cfg, e))
        y.index_add_(0, token, topk_weights[token, slot].unsqueeze(1) * _swiglu(xf[token], gate, up, down))
    if cfg.n_shared_experts:
        y += _swiglu(xf, *(sd[f"shared_experts.{p}_proj.weight"].float() for p in ("gate", "up", "down")))
    return y
