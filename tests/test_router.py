"""Routing equals transformers' DeepseekV3TopkRouter; softmax routing equals a per-token loop."""

from __future__ import annotations

import pytest
import torch

from epruntime.config.schema import Config
from epruntime.layer.router import route
from tests.factories import hf_config, layer_weights, make_config, tokens

SHAPES = [
    dict(),  # 16 experts, 4 groups, top-2 groups, K=4
    dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, hidden_size=128),  # DeepSeek-V3
    dict(n_routed_experts=32, num_experts_per_tok=6, n_group=1, topk_group=1, norm_topk_prob=False),
    dict(n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=8, routed_scaling_factor=1.0),
]


def sorted_by_id(idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (expert id, weight) pairs in increasing id order."""
    order = idx.argsort(dim=1)
    return idx.gather(1, order), weights.gather(1, order)


def hf_route(cfg: Config, sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepseekV3TopkRouter on ``x [T, H]`` with ``sd``'s gate: ids and weights ``[T, K]`` by id."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf = DeepseekV3TopkRouter(hf_config(cfg))
    hf.weight.data.copy_(sd["gate.weight"])
    hf.e_score_correction_bias.copy_(sd["gate.e_score_correction_bias"])
    _, weights, idx = hf(x)
    return sorted_by_id(idx, weights)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_route_matches_transformers(shape: dict, seed: int) -> None:
    cfg = make_config(**shape)
    sd = layer_weights(cfg, seed, bias_scale=20.0)  # large biases, many of them negative
    assert (sd["gate.e_score_correction_bias"] < 0).any()
    x = tokens(300, cfg.model.hidden_size, seed + 100)
    idx, weights = route(x, sd["gate.weight"], sd["gate.e_score_correction_bias"], cfg.model)
    assert idx.shape == weights.shape == (300, cfg.model.num_experts_per_tok)
    idx, weights = sorted_by_id(idx, weights)
    hf_idx, hf_weights = hf_route(cfg, sd, x)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)


def test_softmax_routing_matches_per_token_loop() -> None:
    cfg = make_config(scoring_func="softmax", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    m = cfg.model
    sd = layer_weights(cfg, 5)
    gate, bias = sd["gate.weight"], torch.zeros(m.n_routed_experts)
    x = tokens(50, m.hidden_size, 6)
    idx, weights = sorted_by_id(*route(x, gate, bias, m))
    per_group = m.n_routed_experts // m.n_group
    for t in range(x.shape[0]):
        scores = torch.softmax(x[t] @ gate.T, dim=0).tolist()
        best_of_group = [max(scores[g * per_group : (g + 1) * per_group]) for g in range(m.n_group)]
        groups = sorted(range(m.n_group), key=lambda g: -best_of_group[g])[: m.topk_group]
        allowed = [e for e in range(m.n_routed_experts) if e // per_group in groups]
        chosen = sorted(sorted(allowed, key=lambda e: -scores[e])[: m.num_experts_per_tok])
        total = sum(scores[e] for e in chosen)
        assert idx[t].tolist() == chosen
        expected = torch.tensor([scores[e] / total * m.routed_scaling_factor for e in chosen])
        torch.testing.assert_close(weights[t], expected, rtol=1e-5, atol=1e-6)
