"""``epruntime plan``: placement, per-rank memory and expected traffic of a config, launching nothing.

Routes are sampled from the router's distribution: the synthetic gate of :mod:`epruntime.weights`
(built alone, without any expert) applied to random tokens that are spread evenly over the
ranks. For those routes the traffic model counts what each dispatcher sends exactly as its
counters do (see :mod:`epruntime.dispatch`), then scales to the configured batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from epruntime.cli.eplb import (
    SlotShape,
    format_comparison,
    place,
    placement_config,
    predicted_balance,
    read_expert_load,
)
from epruntime.config.schema import Config, ConfigError, load_config
from epruntime.dispatch import registry
from epruntime.dispatch.base import Traffic, traffic_report
from epruntime.dispatch.deepep import LL_MESSAGE_HEADER_BYTES
from epruntime.dispatch.flat import destinations
from epruntime.io.fp8 import BLOCK
from epruntime.io.weights import gate_weights
from epruntime.layer.router import route
from epruntime.layer.synthetic import synthetic_state_dict
from epruntime.parallel.placement import ExpertPlacement
from epruntime.parallel.topology import Topology

_MB = 1e6


def topology_of(cfg: Config) -> Topology:
    """The placement arithmetic of ``cfg`` (the same one the launched job uses)."""
    return Topology(cfg.topology.nnodes, cfg.topology.ranks_per_node, cfg.model.n_routed_experts)


def sample_routes(cfg: Config, num_tokens: int) -> torch.Tensor:  # [S, K] int64 global expert ids
    """Route ``num_tokens`` random tokens with the synthetic gate of ``runtime.seed`` (no expert is built)."""
    gate_only = dataclasses.replace(cfg.model, n_shared_experts=0)
    sd = synthetic_state_dict(gate_only, cfg.runtime.seed, experts=(), routing_skew=cfg.runtime.routing_skew)
    gen = torch.Generator().manual_seed(cfg.runtime.seed)
    x = torch.randn(num_tokens, cfg.model.hidden_size, generator=gen)  # [S, H]
    topk_idx, _ = route(x, *gate_weights(sd, cfg.model), cfg.model, topology_of(cfg).experts_per_node)
    return topk_idx


def _pair_rows(topk_idx: torch.Tensor, src_rank: torch.Tensor, topo: Topology) -> dict[str, int]:
    """One message per (token, expert) pair to the expert's rank (DeepEP's low-latency layout)."""
    dest = torch.div(topk_idx, topo.experts_per_rank, rounding_mode="floor")  # [S, K]
    src = src_rank.unsqueeze(1)  # [S, 1]
    remote = dest != src
    same_node = dest // topo.ranks_per_node == src // topo.ranks_per_node
    return {"intra_node": int((remote & same_node).sum()), "inter_node": int((remote & ~same_node).sum())}


def expected_traffic(
    topk_idx: torch.Tensor,  # [S, K] global expert ids
    src_rank: torch.Tensor,  # [S] the rank each token starts on
    topo: Topology,
    row_bytes: int,
    meta_bytes: int,
    scale: float = 1.0,
    capacity: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Bytes sent per dispatcher, phase and link for these routes, times ``scale`` (``traffic_bytes`` shape),
    for every dispatcher of the registry that declares a traffic model:

    - ``per_rank`` (flat, deepep): one row per (token, remote rank hosting one of its experts);
    - ``per_node_then_rank`` (hierarchical): one row per (token, remote node) over the rail, plus one per
      (token, hosting rank) whose local index differs from the source's (the forwarder in every node has
      the source's local index);
    - ``per_pair`` (deepep_low_latency): one message per (token, expert) pair to the expert's rank, with
      DeepEP's 16-byte header as its metadata;
    - ``fixed_blocks`` (lowlatency, needs ``capacity``): every rank sends every other rank ``capacity`` slots
      per call, whatever its batch (not scaled).

    Combine sends the same rows back without metadata.
    """
    rank = torch.arange(topo.world_size)  # [W]
    rank_node, rank_local = rank // topo.ranks_per_node, rank % topo.ranks_per_node  # [W], [W]
    src_node, src_local = src_rank // topo.ranks_per_node, src_rank % topo.ranks_per_node  # [S], [S]
    needs_rank = destinations(topk_idx, topo.experts_per_rank, topo.world_size)  # [S, W]
    needs_node = destinations(topk_idx, topo.experts_per_node, topo.nnodes)  # [S, N]
    other_node = rank_node != src_node.unsqueeze(1)  # [S, W]
    rows = {
        "per_rank": {
            "intra_node": int((needs_rank & ~other_node & (rank != src_rank.unsqueeze(1))).sum()),
            "inter_node": int((needs_rank & other_node).sum()),
        },
        "per_node_then_rank": {
            "intra_node": int((needs_rank & (rank_local != src_local.unsqueeze(1))).sum()),
            "inter_node": int((needs_node & (torch.arange(topo.nnodes) != src_node.unsqueeze(1))).sum()),
        },
        "per_pair": _pair_rows(topk_idx, src_rank, topo),
    }
    scales = dict.fromkeys(rows, scale)
    metas = dict.fromkeys(rows, meta_bytes) | {"per_pair": LL_MESSAGE_HEADER_BYTES}  # DeepEP's message header
    if capacity is not None:
        w, rpn = topo.world_size, topo.ranks_per_node
        rows["fixed_blocks"] = {"intra_node": w * (rpn - 1) * capacity, "inter_node": w * (w - rpn) * capacity}
        scales["fixed_blocks"] = 1.0
    reports = {}
    for backend in registry.BACKENDS:
        model = backend.traffic_model
        if model not in rows:
            continue
        traffic = Traffic()
        for link, n in rows[model].items():
            traffic.add("dispatch", link, round(n * scales[model] * row_bytes))
            traffic.add("dispatch", "metadata", round(n * scales[model] * metas.get(model, meta_bytes)))
            traffic.add("combine", link, round(n * scales[model] * row_bytes))
        reports[backend.name] = traffic_report(traffic.as_tensor())
    return reports


def buffer_rows(topk_idx: torch.Tensor, src_rank: torch.Tensor, topo: Topology) -> dict[str, torch.Tensor]:
    """[W] dispatch rows each rank holds (sent + received, every stage) for these routes, per backend."""
    w, lpn = topo.world_size, topo.ranks_per_node
    src_local = (src_rank % lpn).unsqueeze(1)  # [S, 1]
    needs_rank = destinations(topk_idx, topo.experts_per_rank, w)  # [S, W]
    needs_node = destinations(topk_idx, topo.experts_per_node, topo.nnodes)  # [S, N]
    received = needs_rank.sum(dim=0)  # [W] every rank receives each token it hosts experts for once

    def per_rank(owner: torch.Tensor, needs: torch.Tensor) -> torch.Tensor:  # [S, D] owner of each needed pair
        return torch.bincount(owner.expand_as(needs)[needs], minlength=w)

    flat_sent = per_rank(src_rank.unsqueeze(1), needs_rank)
    rail_sent = per_rank(src_rank.unsqueeze(1), needs_node)
    forwarder_of_node = torch.arange(topo.nnodes) * lpn + src_local  # [S, N]
    forwarder_of_rank = torch.arange(w) // lpn * lpn + src_local  # [S, W]
    rail_received = per_rank(forwarder_of_node, needs_node)
    forwarded = per_rank(forwarder_of_rank, needs_rank)
    return {"flat": flat_sent + received, "hierarchical": rail_sent + rail_received + forwarded + received}


def expert_bytes(cfg: Config) -> int:
    """Bytes of one routed expert on a rank that holds it (its ``1 / moe_tp`` slice): FP8 with 128 x 128 fp32
    block scales under ``grouped_gemm: deep_gemm``, else the compute dtype."""
    m = cfg.model
    h, inter = m.hidden_size, m.moe_intermediate_size // cfg.runtime.moe_tp  # each expert's slice on this rank
    if cfg.runtime.grouped_gemm == "deep_gemm":  # [2I, H] and [H, I] in e4m3, one fp32 scale per block
        rows, cols = BLOCK
        blocks = math.ceil(2 * inter / rows) * math.ceil(h / cols) + math.ceil(h / rows) * math.ceil(inter / cols)
        return 3 * h * inter + 4 * blocks
    return 3 * h * inter * m.torch_dtype.itemsize


def weight_bytes(cfg: Config) -> dict[str, int]:
    """Per-rank bytes of one MoE layer: the routed expert slices this rank holds (:func:`expert_bytes` each), its
    share of the shared expert, and the fp32 gate."""
    m, run = cfg.model, cfg.runtime
    held = (m.n_routed_experts + run.redundant_experts) * run.moe_tp // topology_of(cfg).world_size  # its slots
    return {
        "routed_experts": held * expert_bytes(cfg),
        "shared_expert": 3
        * m.hidden_size
        * m.shared_intermediate_size
        * m.torch_dtype.itemsize
        // run.shared_expert_tp,
        "gate": (m.n_routed_experts * m.hidden_size + m.n_routed_experts) * 4,
    }


def routed_with_placement(
    phy2log: torch.Tensor, shape: SlotShape, topk_idx: torch.Tensor, src_rank: torch.Tensor, row_bytes: int
) -> dict[str, Any]:
    """What routes ``topk_idx [S, K]`` from EP ranks ``src_rank [S]`` do once :meth:`ExpertPlacement.choose` has
    mapped them to the slots of ``phy2log [L, P]``: inter-node payload bytes per token (dispatch + combine) per
    dispatcher, the mean over the layers' placements; and the busiest EP rank over the mean of the (token, expert)
    pairs received, median and max over layers."""
    topo = Topology(shape.nodes, shape.ranks_per_node, phy2log.shape[1])
    rows, layer_of = torch.unique(phy2log, dim=0, return_inverse=True)  # [D, P] each distinct placement once, [L]
    per_row = []
    for row in rows:
        placed = ExpertPlacement.from_row(row, shape.experts, shape.ep_world, shape.ranks_per_node)
        slots = torch.empty_like(topk_idx)  # [S, K]
        for r in range(shape.ep_world):
            mine = src_rank == r
            slots[mine] = placed.choose(topk_idx[mine], r)
        traffic = expected_traffic(slots, src_rank, topo, row_bytes, 0)
        pairs = torch.bincount(slots.reshape(-1) // placed.slots_per_rank, minlength=shape.ep_world).double()  # [W]
        per_row.append(({b: t["inter_node"] / len(topk_idx) for b, t in traffic.items()}, pairs.max() / pairs.mean()))
    per_layer = [per_row[i] for i in layer_of.tolist()]
    busiest = torch.tensor([b for _, b in per_layer])  # [L]
    return {
        "inter_node_bytes_per_token": {b: sum(t[b] for t, _ in per_layer) / len(per_layer) for b in per_row[0][0]},
        "routed_max_over_mean": {"median": float(busiest.median()), "max": float(busiest.max())},
    }


def compare_placements(
    cfg: Config, load: torch.Tensor, load_path: str, topk_idx: torch.Tensor, moe_layers: int | None = None
) -> dict[str, Any]:
    """Contiguous (when the experts divide over the EP world), hierarchical and global placements of ``load
    [L, E]``: busiest EP rank over the mean from the load (each expert's load split evenly over its replicas), and
    from the sampled routes ``topk_idx [S, K]`` after replica choice, with their inter-node bytes per token; and what
    the redundant slots cost in memory."""
    shape = SlotShape.of(cfg)
    src_rank = torch.arange(len(topk_idx)) % shape.ep_world  # [S] sampled tokens spread evenly over EP ranks
    row_bytes = cfg.model.hidden_size * cfg.model.torch_dtype.itemsize
    candidates = {"hierarchical": place(load, shape), "global": place(load, shape, hierarchical=False)}
    if shape.experts % shape.ep_world == 0:
        identity = torch.arange(shape.experts).expand(len(load), -1)  # [L, E]: R = 0, slot p holds expert p
        candidates = {"contiguous": identity, **candidates}
    rows = {}
    for name, phy2log in candidates.items():
        rows[name] = {
            "policy": "R = 0, slot p holds expert p" if name == "contiguous" else shape.policy(name == "hierarchical"),
            "max_over_mean": predicted_balance(load, phy2log, shape.ep_world),
            **routed_with_placement(phy2log, shape, topk_idx, src_rank, row_bytes),
        }
    one = expert_bytes(cfg)
    return {
        "path": load_path,
        "layers": len(load),
        "redundant_experts": shape.redundant,
        "slots": shape.slots,
        "ep_world": shape.ep_world,
        "placements": rows,
        "bytes_per_redundant_expert": one,  # per MoE layer, on the rank that holds it
        "redundant_bytes_per_rank": shape.redundant / shape.ep_world * one * (moe_layers or 1),
        "moe_layers": moe_layers,
    }


def placement(cfg: Config) -> list[dict[str, Any]]:
    """Per node: its ranks, each rank's expert range, and the expert groups it hosts (whole or in part)."""
    topo, per_group = topology_of(cfg), cfg.model.n_routed_experts // cfg.model.n_group
    nodes = []
    for node in range(topo.nnodes):
        ranks = topo.node_ranks(node)
        experts = range(topo.expert_range(ranks[0]).start, topo.expert_range(ranks[-1]).stop)
        groups = range(experts.start // per_group, (experts.stop - 1) // per_group + 1)
        nodes.append(
            {
                "node": node,
                "ranks": {r: [topo.expert_range(r).start, topo.expert_range(r).stop - 1] for r in ranks},
                "experts": [experts.start, experts.stop - 1],
                "groups": list(groups),
                "whole_groups": experts.start % per_group == 0 and experts.stop % per_group == 0,
            }
        )
    return nodes


def make_plan(
    cfg: Config, samples: int, expert_load: str | None = None, moe_layers: int | None = None
) -> dict[str, Any]:
    """Everything ``epruntime plan`` prints, as a JSON-ready dict (bytes per layer over all ranks); with
    ``expert_load`` (a load file of 1 or ``moe_layers`` rows) also :func:`compare_placements` for it."""
    if samples <= 0:
        raise ConfigError(f"--samples: must be positive, got {samples}; pass e.g. --samples 4096")
    m, topo = cfg.model, topology_of(cfg)
    batch = topo.world_size * cfg.runtime.tokens_per_rank  # tokens per layer at the configured batch
    topk_idx = sample_routes(cfg, samples)  # [S, K]
    src_rank = torch.arange(samples) % topo.world_size  # [S] sampled tokens spread evenly over ranks
    row_bytes = m.hidden_size * m.torch_dtype.itemsize
    meta_bytes = 2 * m.num_experts_per_tok * 4  # int32 local ids + fp32 weights per row
    scale = batch / samples
    capacity = cfg.runtime.max_tokens_per_rank
    traffic = expected_traffic(topk_idx, src_rank, topo, row_bytes, meta_bytes, scale, capacity)
    if cfg.runtime.tokens_per_rank > capacity:  # the fixed-capacity backends cannot carry this batch
        traffic = {b: v for b, v in traffic.items() if not registry.backend(b).capacity_bound}
    rows = buffer_rows(topk_idx, src_rank, topo)
    buffers = {b: round(float(r.max()) * scale) * (row_bytes + meta_bytes) for b, r in rows.items()}
    needs_node = destinations(topk_idx, topo.experts_per_node, topo.nnodes)  # [S, N]
    plan = {
        "world_size": topo.world_size,
        "nnodes": topo.nnodes,
        "ranks_per_node": topo.ranks_per_node,
        "experts_per_rank": topo.experts_per_rank,
        "dtype": m.dtype,
        "tokens_per_rank": cfg.runtime.tokens_per_rank,
        "samples": samples,
        "max_nodes_per_token": m.max_nodes_per_token,
        "mean_nodes_per_token": needs_node.sum(dim=1).float().mean().item(),
        "placement": placement(cfg),
        "weight_bytes_per_rank": weight_bytes(cfg),
        "dispatch_buffer_bytes_per_rank": buffers,
        "traffic_bytes": traffic,
        "inter_node_bytes_per_token": {b: t["inter_node"] / max(batch, 1) for b, t in traffic.items()},
    }
    if expert_load:
        load = read_expert_load(expert_load, m.n_routed_experts, moe_layers)  # [L, E]
        plan["expert_load"] = compare_placements(cfg, load, expert_load, topk_idx, moe_layers)
    return plan


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as printed by ``epruntime plan``."""
    limit = p["max_nodes_per_token"]
    lines = [
        f"epruntime plan: {p['world_size']} ranks = {p['nnodes']} nodes x {p['ranks_per_node']} | "
        f"{p['experts_per_rank']} experts/rank | {p['tokens_per_rank']} tokens/rank | {p['dtype']} | "
        f"max_nodes_per_token {limit if limit is not None else 'off'}",
        "placement (experts per rank; * = group shared with another node)",
    ]
    for n in p["placement"]:
        groups = _span(n["groups"][0], n["groups"][-1]) + ("" if n["whole_groups"] else "*")
        lines.append(f"  node {n['node']}: experts {_span(*n['experts'])}, groups {groups}")
        lines.append("    " + "  ".join(f"r{r}: {_span(*span)}" for r, span in n["ranks"].items()))
    weights = p["weight_bytes_per_rank"]
    lines.append(
        "weights per rank: "
        + ", ".join(f"{k.replace('_', ' ')} {v / _MB:,.1f} MB" for k, v in weights.items())
        + f"; total {sum(weights.values()) / _MB:,.1f} MB"
    )
    buffers = p["dispatch_buffer_bytes_per_rank"]
    lines.append(
        "dispatch buffers on the busiest rank (sent + received rows with routing; combine reuses the sizes): "
        + ", ".join(f"{b} {v / _MB:,.1f} MB" for b, v in buffers.items())
    )
    lines.append(
        f"expected bytes per layer, all ranks ({p['samples']} sampled routes; "
        f"{p['mean_nodes_per_token']:.2f} nodes per token on average)"
    )
    lines.append(f"  {'backend':<20}{'phase':<10}{'intra-node':>14}{'inter-node':>14}{'metadata':>12}")
    for backend, t in p["traffic_bytes"].items():
        for phase in ("dispatch", "combine"):
            v = t[phase]
            lines.append(
                f"  {backend:<20}{phase:<10}{v['intra_node'] / _MB:>11,.2f} MB{v['inter_node'] / _MB:>11,.2f} MB"
                f"{v['metadata'] / _MB:>9,.2f} MB"
            )
    per_token = p["inter_node_bytes_per_token"]
    lines.append(
        "inter-node bytes per token (dispatch + combine): " + ", ".join(f"{b} {v:,.0f} B" for b, v in per_token.items())
    )
    if "checkpoint" in p:
        ckpt = p["checkpoint"]
        most = max(ckpt["weight_bytes_per_rank"], key=lambda b: b["total"])
        lines.append(
            f"checkpoint {ckpt['path']} ({ckpt['layers']} layers), weights on the fullest rank: routed experts "
            f"{most['routed_experts'] / _MB:,.1f} MB, replicated {most['replicated'] / _MB:,.1f} MB; "
            f"total {most['total'] / _MB:,.1f} MB"
        )
    if "expert_load" in p:
        lines += format_comparison(p["expert_load"])
    return "\n".join(lines)


def _checkpoint_section(reader: Any, cfg: Config) -> dict[str, Any]:
    from epruntime.io.checkpoint import checkpoint_weight_bytes_per_rank

    per_rank = checkpoint_weight_bytes_per_rank(
        reader, topology_of(cfg), cfg.model.torch_dtype, grouped_gemm=cfg.runtime.grouped_gemm
    )
    return {"path": str(reader.path), "layers": reader.num_layers, "weight_bytes_per_rank": per_rank}


def plan_main(args: argparse.Namespace) -> int:
    """Entry point of ``epruntime plan``: print the plan (and write it as JSON); returns the exit status.
    With ``--checkpoint`` the model comes from its config.json and the whole model's weights are sized; with
    ``--expert-load`` the placements for that load are compared (``runtime.redundant_experts`` slots)."""

    def config(load: Callable[[list[str]], Config]) -> Config:  # R > 0 with no placement file is the question
        return placement_config(load, args.overrides) if args.expert_load else load(args.overrides)

    if args.checkpoint:
        from epruntime.cli.checkpoint_config import generate_config
        from epruntime.io.checkpoint import CheckpointError, CheckpointReader

        try:
            reader = CheckpointReader(args.checkpoint)
            cfg = config(lambda overrides: generate_config(reader, args.config, overrides, args.dtype))
            moe_layers = sum(reader.is_moe_layer(i) for i in range(reader.num_layers))
            p = make_plan(cfg, args.samples, args.expert_load, moe_layers)
            p["checkpoint"] = _checkpoint_section(reader, cfg)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    else:
        p = make_plan(config(lambda overrides: load_config(args.config, overrides)), args.samples, args.expert_load)
    print(format_plan(p), flush=True)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(p, indent=2))
    return 0
