"""The single-process reference is independent: its routing equals transformers' and a brute-force search, its
output equals transformers' DeepseekV3MoE, and it does not use the router under test."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

import epruntime.layer.reference as reference
from epruntime.config.schema import MoEConfig
from epruntime.layer import router
from epruntime.layer.reference import reference_moe, reference_route
from tests.factories import hf_moe, layer_weights, make_config, rel_err, tokens
from tests.test_router import SHAPES, hf_route, sorted_by_id


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_routing_matches_transformers(shape: dict, seed: int) -> None:
    cfg = make_config(**shape)
    sd = layer_weights(cfg, seed + 10, bias_scale=20.0)  # large biases, many of them negative
    x = tokens(400, cfg.model.hidden_size, seed + 200)
    idx, weights = reference_route(x, sd["gate.weight"], sd["gate.e_score_correction_bias"], cfg.model)
    assert idx.shape == weights.shape == (400, cfg.model.num_experts_per_tok) and idx.dtype == torch.int64
    idx, weights = sorted_by_id(idx, weights)
    hf_idx, hf_weights = hf_route(cfg, sd, x)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_output_matches_transformers_moe(shape: dict) -> None:
    cfg = make_config(**shape)
    sd = layer_weights(cfg, 20, bias_scale=5.0)
    x = tokens(300, cfg.model.hidden_size, 21)
    with torch.no_grad():
        expected = hf_moe(cfg, sd)(x.unsqueeze(0)).squeeze(0)
    assert rel_err(reference_moe(x, sd, cfg.model), expected) <= 1e-5


def _wrong_route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    cfg: MoEConfig,
    experts_per_node: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts 0..K-1 for every token, equal weights: what the patched router returns."""
    k = cfg.num_experts_per_tok
    return torch.arange(k).expand(x.shape[0], k), torch.full((x.shape[0], k), 1.0 / k)


def test_reference_does_not_use_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the router's own code replaced (so every name bound to it routes wrongly) the reference's output is
    unchanged; and it imports nothing but torch, the config and the weight accessors."""
    cfg = make_config()
    sd = layer_weights(cfg, 30)
    x = tokens(64, cfg.model.hidden_size, 31)
    before = reference_moe(x, sd, cfg.model)
    gate, bias = sd["gate.weight"], sd["gate.e_score_correction_bias"]
    monkeypatch.setattr(router.route, "__code__", _wrong_route.__code__)
    assert (router.Router(cfg.model, gate, bias)(x)[0] == torch.arange(cfg.model.num_experts_per_tok)).all()
    assert torch.equal(reference_moe(x, sd, cfg.model), before)
    tree = ast.parse(Path(reference.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "torch", "torch.nn.functional", "epruntime.config.schema", "epruntime.io.weights"}


def _best(scores: dict[int, float], size: int) -> tuple[int, ...]:
    """The ``size`` keys of ``scores`` with the highest total, by trying every subset."""
    return max(itertools.combinations(scores, size), key=lambda subset: sum(scores[c] for c in subset))


def _top_sum(values: list[float], n: int) -> float:
    return sum(sorted(values, reverse=True)[:n]) if len(values) >= n else float("-inf")


def _brute_force_route(
    x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, m: MoEConfig, per_node: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Per token, every subset tried: the M nodes, then the topk_group groups, then the K experts of highest total."""
    k, num_experts, per_group = m.num_experts_per_tok, m.n_routed_experts, m.n_routed_experts // m.n_group
    group_top = 2 if m.scoring_func == "sigmoid" else 1
    ids, weights = [], []
    for t in range(x.shape[0]):
        logits = x[t : t + 1] @ gate.T
        scores = (logits.sigmoid() if m.scoring_func == "sigmoid" else logits.softmax(dim=1))[0].tolist()
        choice = [s + b for s, b in zip(scores, bias.tolist(), strict=True)]
        in_node = {n: range(n * per_node, (n + 1) * per_node) for n in range(num_experts // per_node)}
        per = k // m.max_nodes_per_token
        nodes = _best({n: _top_sum([choice[e] for e in es], per) for n, es in in_node.items()}, m.max_nodes_per_token)
        allowed = [e for n in nodes for e in in_node[n]]
        in_group = {g: [e for e in allowed if e // per_group == g] for g in range(m.n_group)}
        groups = _best({g: _top_sum([choice[e] for e in es], group_top) for g, es in in_group.items()}, m.topk_group)
        chosen = sorted(_best({e: choice[e] for g in groups for e in in_group[g]}, k))
        total = sum(scores[e] for e in chosen) + 1e-20 if m.norm_topk_prob else 1.0
        ids.append(chosen)
        weights.append([scores[e] / total * m.routed_scaling_factor for e in chosen])
    return ids, weights


NODE_LIMITED = [
    # 4 nodes of 4 experts, 8 groups of 2: M=2 nodes (K/M=2 each), then top-3 groups, K=4
    (4, dict(n_routed_experts=16, num_experts_per_tok=4, n_group=8, topk_group=3, max_nodes_per_token=2)),
    # softmax, 2 nodes of 8, 4 groups of 4: M=1 node (K/M=3), both its groups, K=3
    (2, dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, max_nodes_per_token=1,
             scoring_func="softmax")),
    # 8 nodes of 2 experts, no groups: M=3 nodes, K=6
    (8, dict(n_routed_experts=16, num_experts_per_tok=6, n_group=1, topk_group=1, max_nodes_per_token=3)),
]  # fmt: skip


@pytest.mark.parametrize(("nnodes", "model"), NODE_LIMITED)
def test_node_limited_reference_routing_matches_brute_force(nnodes: int, model: dict) -> None:
    cfg = make_config(nnodes, 1, **model)
    m, per_node = cfg.model, cfg.model.n_routed_experts // nnodes
    sd = layer_weights(cfg, 40, bias_scale=10.0)
    gate, bias = sd["gate.weight"], sd["gate.e_score_correction_bias"]
    x = tokens(60, m.hidden_size, 41)
    idx, weights = sorted_by_id(*reference_route(x, gate, bias, m, per_node))
    brute_ids, brute_weights = _brute_force_route(x, gate, bias, m, per_node)
    assert idx.tolist() == brute_ids
    torch.testing.assert_close(weights, torch.tensor(brute_weights), rtol=1e-5, atol=1e-6)
    assert ((idx // per_node).unsqueeze(2) == torch.arange(nnodes)).any(dim=1).sum(dim=1).max() <= m.max_nodes_per_token
    unlimited = dataclasses.replace(m, max_nodes_per_token=None)
    assert not torch.equal(sorted_by_id(*reference_route(x, gate, bias, unlimited))[0], idx)  # the limit matters here
    with pytest.raises(ValueError, match="pass experts_per_node"):
        reference_route(x, gate, bias, m)
