"""``hierarchical`` fulfils the dispatch contract and gives the layer output of ``flat`` and the reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from epruntime.dispatch.base import PHASES
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import Runtime
from epruntime.parallel.topology import Topology
from tests.cases import LayerCase
from tests.distributed import run_world
from tests.factories import dispatcher_for, layer_weights, make_config, rel_err, tokens

MODEL = dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2)
COMPARED = ("flat", "hierarchical")


def _run_cases(rt: Runtime, cases: list[LayerCase]) -> list[dict[str, Any]]:
    """Per case: the routes, and per backend the dispatch result, the layer output and the traffic."""
    outs = []
    for case in cases:
        layer = case.layer(rt)
        x = case.xs[rt.rank]
        topk_idx, topk_weights = layer.router(x)
        out: dict[str, Any] = {"topk_idx": topk_idx, "topk_weights": topk_weights}
        for name in COMPARED:
            layer.dispatcher = dispatcher_for(rt, name)
            result = layer.dispatcher.dispatch(x, topk_idx, topk_weights)
            layer.dispatcher.traffic.reset()
            y = layer(x)
            out[name] = {
                "recv": (result.recv_x, result.recv_topk_idx, result.recv_topk_weights),
                "tokens_per_expert": result.tokens_per_expert,
                "y": y,
                "traffic": dict(layer.dispatcher.traffic.bytes),
            }
        outs.append(out)
    return outs


def _by_first_column(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    order = x[:, 0].argsort()
    return x[order], idx[order], w[order]


def _check_contract(topo: Topology, case: LayerCase, outs: list[dict[str, Any]], backend: str) -> None:
    """Each rank received exactly the tokens that need it, once, with local ids and the source's weights."""
    e_local = topo.experts_per_rank
    x_all = case.x_all()  # [T_all, H]
    idx_all = torch.cat([o["topk_idx"] for o in outs])  # [T_all, K]
    w_all = torch.cat([o["topk_weights"] for o in outs])  # [T_all, K]
    for rank, out in enumerate(outs):
        mine = (idx_all >= rank * e_local) & (idx_all < (rank + 1) * e_local)  # [T_all, K]
        rows = mine.any(dim=1)  # the tokens that need this rank, each once
        local = torch.where(mine, idx_all - rank * e_local, -1)[rows]  # ids local to this rank, -1 elsewhere
        expected = _by_first_column(x_all[rows], local, w_all[rows])
        got = _by_first_column(*out[backend]["recv"])
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g), f"{case.name}: rank {rank} received the wrong rows ({backend})"
        counts = torch.bincount(idx_all[mine] - rank * e_local, minlength=e_local)
        assert torch.equal(out[backend]["tokens_per_expert"], counts), f"{case.name}: rank {rank} ({backend})"


def _nodes_per_token(routes: torch.Tensor, experts_per_node: int) -> list[int]:
    """How many nodes each token's experts lie on."""
    return [len(set(row.tolist())) for row in routes // experts_per_node]


def _cases(cfg, counts: list[int]) -> list[LayerCase]:
    h = cfg.model.hidden_size
    topo = Topology(cfg.topology.nnodes, cfg.topology.ranks_per_node, cfg.model.n_routed_experts)
    xs = [tokens(n, h, 100 + r) for r, n in enumerate(counts)]
    hot = layer_weights(cfg, 2)
    hot["gate.e_score_correction_bias"][-1] = 100.0  # every token picks the last rank's last expert
    own = layer_weights(cfg, 3)
    own["gate.e_score_correction_bias"][: topo.experts_per_node] += 100.0  # only node 0's experts are chosen
    cases = [
        LayerCase("random", layer_weights(cfg, 1, bias_scale=5.0), xs),
        LayerCase("zero-token ranks", layer_weights(cfg, 4), [x if r % 3 else x[:0] for r, x in enumerate(xs)]),
        LayerCase("all tokens to one expert", hot, xs),
        LayerCase("experts on node 0 only", own, xs),
        LayerCase("all ranks empty", layer_weights(cfg, 5), [x[:0] for x in xs]),
    ]
    if topo.nnodes > 1:
        cases.append(LayerCase("node-limited M=1", layer_weights(cfg, 6), xs, {"max_nodes_per_token": 1}))
    return cases


@pytest.mark.parametrize(("nnodes", "ranks_per_node"), [(2, 2), (2, 4), (4, 2), (1, 4)])
def test_hierarchical_equals_flat_and_reference(nnodes: int, ranks_per_node: int) -> None:
    cfg = make_config(nnodes, ranks_per_node, runtime={"dispatcher": "hierarchical"}, **MODEL)
    topo = Topology(nnodes, ranks_per_node, cfg.model.n_routed_experts)
    world = topo.world_size
    cases = _cases(cfg, [(11 * r + 5) % 23 + 1 for r in range(world)])
    results = run_world(_run_cases, cfg, cases)
    for i, case in enumerate(cases):
        outs = [per_rank[i] for per_rank in results]
        model = case.model_config(cfg.model)
        expected = reference_moe(case.x_all(), case.sd, model, topo.experts_per_node)  # [T_all, H]
        flat = torch.cat([o["flat"]["y"] for o in outs])
        hier = torch.cat([o["hierarchical"]["y"] for o in outs])
        assert hier.shape == expected.shape
        assert rel_err(hier, expected) <= 1e-5, case.name
        assert rel_err(hier, flat) <= 1e-5, case.name
        assert rel_err(flat, expected) <= 1e-5, case.name
        for backend in COMPARED:
            _check_contract(topo, case, outs, backend)
        routes = torch.cat([o["topk_idx"] for o in outs])  # [T_all, K]
        inter = [o["hierarchical"]["traffic"].get("dispatch.inter_node", 0) for o in outs]
        if nnodes == 1:  # one node: only the intra-node stage moves data, the same rows as flat
            assert all(o["hierarchical"]["traffic"].get(f"{p}.inter_node", 0) == 0 for o in outs for p in PHASES)
            assert [o["hierarchical"]["traffic"] for o in outs] == [o["flat"]["traffic"] for o in outs]
        if case.name == "all tokens to one expert":
            assert (routes == topo.num_experts - 1).any(dim=1).all()
        if case.name == "experts on node 0 only":  # node 0's tokens never leave their node
            assert (routes < topo.experts_per_node).all()
            assert inter[: topo.ranks_per_node] == [0] * topo.ranks_per_node
        if case.model:  # node-limited to one node: every token's experts are on one node
            assert set(_nodes_per_token(routes, topo.experts_per_node)) == {1}, case.name
