"""Measured traffic per rank, phase and link equals a per-token count from ``topk_idx``, for every backend."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import torch

from epruntime.cli.plan import expected_traffic
from epruntime.dispatch.base import LINKS, PHASES, traffic_report
from epruntime.layer.moe import EPMoE
from epruntime.parallel.runtime import Runtime
from epruntime.parallel.topology import Topology
from tests.distributed import run_world
from tests.factories import SMALL_MODEL, dispatcher_for, layer_weights, make_config, tokens

NNODES, RANKS_PER_NODE = 4, 2
MODEL = dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2)
COMPARED = ("flat", "hierarchical")
HIDDEN = SMALL_MODEL["hidden_size"]
CASES = [("float32", [24] * 8), ("float32", [0, 13, 7, 0, 30, 1, 0, 22]), ("bfloat16", [16] * 8)]


def _measure(rt: Runtime, sd: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per case: this rank's routes and, per backend, the bytes one layer forward sent."""
    outs = []
    for dtype, counts in CASES:
        model = dataclasses.replace(rt.cfg.model, dtype=dtype)
        layer = EPMoE.from_hf_state_dict(model, sd, rt)
        x = tokens(counts[rt.rank], model.hidden_size, 10 + rt.rank).to(model.torch_dtype)
        out: dict[str, Any] = {"topk_idx": layer.router(x)[0]}
        for name in COMPARED:
            layer.dispatcher = dispatcher_for(rt, name)
            layer(x)
            out[name] = {k: v for k, v in layer.dispatcher.traffic.bytes.items() if v}
        outs.append(out)
    return outs


def _count(topo: Topology, routes: list[torch.Tensor], row: int, meta: int) -> dict[str, list[Counter]]:
    """Per backend and rank, the bytes sent, from a plain loop over every token's distinct ranks and nodes."""
    e_local, lpn = topo.experts_per_rank, topo.ranks_per_node
    sent = {name: [Counter() for _ in range(topo.world_size)] for name in ("flat", "hierarchical")}
    flat, hier = sent["flat"], sent["hierarchical"]
    for src, idx in enumerate(routes):
        for token in idx.tolist():
            ranks = {e // e_local for e in token}
            for r in ranks - {src}:  # flat: one row to each remote rank, and one back
                link = "intra_node" if r // lpn == src // lpn else "inter_node"
                flat[src][f"dispatch.{link}"] += row
                flat[src]["dispatch.metadata"] += meta
                flat[r][f"combine.{link}"] += row
            for node in {r // lpn for r in ranks}:  # hierarchical: via the rank with src's local index
                forwarder = node * lpn + src % lpn
                if forwarder != src:
                    hier[src]["dispatch.inter_node"] += row
                    hier[src]["dispatch.metadata"] += meta
                    hier[forwarder]["combine.inter_node"] += row
                for r in {r for r in ranks if r // lpn == node} - {forwarder}:
                    hier[forwarder]["dispatch.intra_node"] += row
                    hier[forwarder]["dispatch.metadata"] += meta
                    hier[r]["combine.intra_node"] += row
    return sent


@pytest.fixture(scope="module")
def measured() -> list[list[dict[str, Any]]]:
    cfg = make_config(NNODES, RANKS_PER_NODE, **MODEL)
    return run_world(_measure, cfg, layer_weights(cfg, 7, bias_scale=5.0))


def _row_bytes(case: int) -> int:
    return HIDDEN * getattr(torch, CASES[case][0]).itemsize


def _distinct_remote(routes: list[torch.Tensor], dest_of, node_of_dest) -> int:
    """Sum over tokens of the number of distinct destinations on another node than the token's source."""
    return sum(
        len({dest_of(e) for e in token if node_of_dest(dest_of(e)) != src // RANKS_PER_NODE})
        for src, idx in enumerate(routes)
        for token in idx.tolist()
    )


@pytest.mark.parametrize("case", range(len(CASES)))
def test_traffic_equals_per_token_count(measured: list[list[dict[str, Any]]], case: int) -> None:
    topo = Topology(NNODES, RANKS_PER_NODE, MODEL["n_routed_experts"])
    row, meta = _row_bytes(case), 2 * MODEL["num_experts_per_tok"] * 4
    outs = [per_rank[case] for per_rank in measured]
    routes = [o["topk_idx"] for o in outs]
    expected = _count(topo, routes, row, meta)
    totals = {}
    for backend in COMPARED:
        for rank, out in enumerate(outs):
            assert Counter(out[backend]) == expected[backend][rank], f"{backend}, rank {rank}"
        totals[backend] = total = sum((Counter(o[backend]) for o in outs), Counter())
        for link in ("intra_node", "inter_node"):  # combine moves one row back per row dispatched
            assert total[f"combine.{link}"] == total[f"dispatch.{link}"]
    # tokens x distinct remote destination nodes (hierarchical) or remote-node ranks (flat) x row bytes
    epn, e_local = topo.experts_per_node, topo.experts_per_rank
    remote_nodes = _distinct_remote(routes, lambda e: e // epn, lambda node: node)
    remote_ranks = _distinct_remote(routes, lambda e: e // e_local, lambda rank: rank // RANKS_PER_NODE)
    assert totals["hierarchical"]["dispatch.inter_node"] == remote_nodes * row > 0
    assert totals["flat"]["dispatch.inter_node"] == remote_ranks * row > remote_nodes * row


@pytest.mark.parametrize("case", range(len(CASES)))
def test_plan_model_equals_measured(measured: list[list[dict[str, Any]]], case: int) -> None:
    topo = Topology(NNODES, RANKS_PER_NODE, MODEL["n_routed_experts"])
    outs = [per_rank[case] for per_rank in measured]
    routes = torch.cat([o["topk_idx"] for o in outs])  # [T_all, K]
    src = torch.cat([torch.full((len(o["topk_idx"]),), r) for r, o in enumerate(outs)])  # [T_all]
    model = expected_traffic(routes, src, topo, _row_bytes(case), 8 * MODEL["num_experts_per_tok"])
    for backend in COMPARED:
        total = sum((Counter(o[backend]) for o in outs), Counter())
        measured_report = traffic_report(torch.tensor([total[f"{p}.{l}"] for p in PHASES for l in LINKS]))
        assert model[backend] == measured_report, backend


def _expert_sends(rt: Runtime, routes: list[torch.Tensor]) -> list[int]:
    """The on-device per-(token, expert) counters of one dispatch and its combine, read back."""
    dispatcher = dispatcher_for(rt, "flat")
    dispatcher.count_expert_sends("dispatch", routes[rt.rank], 100, 4)
    dispatcher.count_expert_sends("combine", routes[rt.rank], 100, 0)
    return dispatcher.traffic.as_tensor().tolist()


def test_low_latency_counters_count_every_token_expert_pair() -> None:
    """DeepEP's low-latency layout sends one message per (token, expert), also to a rank already sent to."""
    cfg = make_config(2, 2, **MODEL)
    topo = Topology(2, 2, MODEL["n_routed_experts"])
    gen = torch.Generator().manual_seed(3)
    routes = [
        torch.randint(-1, MODEL["n_routed_experts"], (t, MODEL["num_experts_per_tok"]), generator=gen)
        for t in (9, 0, 5, 12)
    ]
    measured = run_world(_expert_sends, cfg, routes)
    for src, idx in enumerate(routes):
        expected = Counter()
        for e in idx.reshape(-1).tolist():
            r = e // topo.experts_per_rank
            if e < 0 or r == src:
                continue
            link = "intra_node" if topo.node_of(r) == topo.node_of(src) else "inter_node"
            expected[f"dispatch.{link}"] += 100
            expected["dispatch.metadata"] += 4
            expected[f"combine.{link}"] += 100
        assert measured[src] == [expected[f"{p}.{l}"] for p in PHASES for l in LINKS], src
