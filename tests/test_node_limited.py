"""Node-limited routing (``model.max_nodes_per_token``) equals a per-token loop and is checked in the config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epruntime.config.schema import ConfigError
from epruntime.dispatch.flat import destinations
from epruntime.layer.router import route
from tests.factories import layer_weights, make_config, tokens

CASES = [
    # 4 nodes of 8 experts, each node two whole groups of 4; top-2 of 8 groups; M=2 nodes of K/M=2
    (4, dict(n_routed_experts=32, num_experts_per_tok=4, n_group=8, topk_group=2, max_nodes_per_token=2)),
    # 8 nodes of 4 experts with no group limit; M=3 nodes of K/M=2
    (8, dict(n_routed_experts=32, num_experts_per_tok=6, n_group=1, topk_group=1, max_nodes_per_token=3)),
    # softmax scores, 2 nodes, M=1
    (2, dict(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, max_nodes_per_token=1,
             scoring_func="softmax")),
]  # fmt: skip


def _top(values: dict[int, float], n: int) -> list[int]:
    return sorted(values, key=lambda e: -values[e])[:n]


def _block_score(choice: dict[int, float], block_of, block: int, n: int) -> float:
    """Sum of the ``n`` best choices in one block (a node or a group); -inf when it has fewer left."""
    values = sorted((c for e, c in choice.items() if block_of(e) == block), reverse=True)
    return sum(values[:n]) if len(values) >= n else float("-inf")


def _loop_route(x, gate, bias, m, experts_per_node: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per token: best M nodes by the sum of their top K/M choices, then best groups, then top-K."""
    k, per_group = m.num_experts_per_tok, m.n_routed_experts // m.n_group
    node_of, group_of = (lambda e: e // experts_per_node), (lambda e: e // per_group)
    ids, weights = [], []
    for t in range(x.shape[0]):
        logits = x[t] @ gate.T
        scores = (logits.sigmoid() if m.scoring_func == "sigmoid" else logits.softmax(dim=0)).tolist()
        choice = {e: s + b for e, (s, b) in enumerate(zip(scores, bias.tolist(), strict=True))}
        per_node = k // m.max_nodes_per_token
        nodes = _top(
            {n: _block_score(choice, node_of, n, per_node) for n in range(m.n_routed_experts // experts_per_node)},
            m.max_nodes_per_token,
        )
        choice = {e: c for e, c in choice.items() if node_of(e) in nodes}
        if m.topk_group < m.n_group:
            top = 2 if m.scoring_func == "sigmoid" else 1
            groups = _top({g: _block_score(choice, group_of, g, top) for g in range(m.n_group)}, m.topk_group)
            choice = {e: c for e, c in choice.items() if group_of(e) in groups}
        chosen = sorted(_top(choice, k))
        total = sum(scores[e] for e in chosen) if m.norm_topk_prob else 1.0
        ids.append(chosen)
        weights.append([scores[e] / total * m.routed_scaling_factor for e in chosen])
    return ids, weights


@pytest.mark.parametrize(("nnodes", "model"), CASES)
def test_node_limited_routing_matches_per_token_loop(nnodes: int, model: dict) -> None:
    cfg = make_config(nnodes, 1, **model)
    m, per_node = cfg.model, cfg.model.n_routed_experts // nnodes
    sd = layer_weights(cfg, 3, bias_scale=10.0)
    gate, bias = sd["gate.weight"], sd["gate.e_score_correction_bias"]
    x = tokens(120, m.hidden_size, 4)
    idx, weights = route(x, gate, bias, m, per_node)
    order = idx.argsort(dim=1)
    idx, weights = idx.gather(1, order), weights.gather(1, order)
    assert (destinations(idx, per_node, nnodes).sum(dim=1) <= m.max_nodes_per_token).all()
    loop_ids, loop_weights = _loop_route(x, gate, bias, m, per_node)
    assert idx.tolist() == loop_ids
    torch.testing.assert_close(weights, torch.tensor(loop_weights), rtol=1e-5, atol=1e-6)
    unlimited = dataclasses.replace(m, max_nodes_per_token=None)
    assert not torch.equal(route(x, gate, bias, unlimited)[0].sort(dim=1).values, idx)  # the limit changes routes


def test_limit_of_every_node_is_off() -> None:
    cfg = make_config(4, 1, **CASES[0][1])
    sd = layer_weights(cfg, 5, bias_scale=10.0)
    args = (tokens(64, cfg.model.hidden_size, 6), sd["gate.weight"], sd["gate.e_score_correction_bias"])
    off = route(*args, dataclasses.replace(cfg.model, max_nodes_per_token=None))
    every_node = route(*args, dataclasses.replace(cfg.model, max_nodes_per_token=4), 8)
    assert all(torch.equal(a, b) for a, b in zip(off, every_node, strict=True))
    with pytest.raises(ValueError, match="experts_per_node"):
        route(*args, cfg.model)  # a limit needs the placement


@pytest.mark.parametrize(
    ("topology", "model", "message"),
    [
        ((2, 2), dict(max_nodes_per_token=0), "must be positive"),
        ((2, 2), dict(max_nodes_per_token=4), "more than topology.nnodes=2"),
        ((4, 1), dict(num_experts_per_tok=4, max_nodes_per_token=3), "not divisible by 3"),
        ((8, 1), dict(num_experts_per_tok=4, topk_group=4, max_nodes_per_token=1), "fewer than"),
        ((2, 2), dict(n_group=8, topk_group=4, num_experts_per_tok=4, max_nodes_per_token=1), None),
        ((4, 1), dict(n_group=2, topk_group=1, max_nodes_per_token=2), "whole expert groups"),
    ],
)
def test_config_checks(topology: tuple[int, int], model: dict, message: str | None) -> None:
    if message is None:
        assert make_config(*topology, **model).model.max_nodes_per_token == model["max_nodes_per_token"]
        return
    with pytest.raises(ConfigError, match=message) as err:
        make_config(*topology, **model)
    assert str(err.value).startswith("model.max_nodes_per_token:") and "\n" not in str(err.value)
