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
from pathlib import Path
from typing import Any

import torch

from epruntime.config.schema import Config, ConfigError, load_config
from epruntime.dispatch import registry
from epruntime.dispatch.base import Traffic, traffic_report
from epruntime.dispatch.flat import destinations
from epruntime.io.fp8 import BLOCK
from epruntime.io.weights import gate_weights, random_state_dict
from epruntime.layer.router import route
from epruntime.parallel.topology import Topology

_MB = 1e6


def topology_of(cfg: Config) -> Topology:
    """The placement arithmetic of ``cfg`` (the same one the launched job uses)."""
    return Topology(cfg.topology.nnodes, cfg.topology.ranks_per_node, cfg.model.n_routed_experts)


def sample_routes(cfg: Config, num_tokens: int) -> torch.Tensor:  # [S, K] int64 global expert ids
    """Route ``num_tokens`` random tokens with the synthetic gate of ``runtime.seed`` (no expert is built)."""
    gate_only = dataclasses.replace(cfg.model, n_shared_experts=0)
    sd = random_state_dict(gate_only, cfg.runtime.seed, experts=())
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
    - ``per_pair`` (deepep_low_latency): one message per (token, expert) pair to the expert's rank;
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
            traffic.add("dispatch", "metadata", round(n * scales[model] * meta_bytes))
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


def weight_bytes(cfg: Config) -> dict[str, int]:
    """Per-rank bytes of one MoE layer: the routed expert slices this rank holds (FP8 with 128 x 128 fp32
    block scales under ``grouped_gemm: deep_gemm``, else the compute dtype), its share of the shared expert,
    and the fp32 gate."""
    m, run = cfg.model, cfg.runtime
    h, elt, tp = m.hidden_size, m.torch_dtype.itemsize, run.moe_tp
    inter = m.moe_intermediate_size // tp  # each expert's slice on this rank
    if run.grouped_gemm == "deep_gemm":  # [2I, H] and [H, I] in e4m3, one fp32 scale per block
        rows, cols = BLOCK
        blocks = math.ceil(2 * inter / rows) * math.ceil(h / cols) + math.ceil(h / rows) * math.ceil(inter / cols)
        per_expert = 3 * h * inter + 4 * blocks
    else:
        per_expert = 3 * h * inter * elt
    held = m.n_routed_experts * tp // topology_of(cfg).world_size  # experts of this rank's EP group slot
    return {
        "routed_experts": held * per_expert,
        "shared_expert": 3 * h * m.shared_intermediate_size * elt // run.shared_expert_tp,
        "gate": (m.n_routed_experts * m.hidden_size + m.n_routed_experts) * 4,
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


def make_plan(cfg: Config, samples: int) -> dict[str, Any]:
    """Everything ``epruntime plan`` prints, as a JSON-ready dict (bytes per layer over all ranks)."""
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
    return {
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
    return "\n".join(lines)


def _checkpoint_section(reader: Any, cfg: Config) -> dict[str, Any]:
    from epruntime.io.checkpoint import checkpoint_weight_bytes_per_rank

    per_rank = checkpoint_weight_bytes_per_rank(
        reader, topology_of(cfg), cfg.model.torch_dtype, grouped_gemm=cfg.runtime.grouped_gemm
    )
    return {"path": str(reader.path), "layers": reader.num_layers, "weight_bytes_per_rank": per_rank}


def plan_main(args: argparse.Namespace) -> int:
    """Entry point of ``epruntime plan``: print the plan (and write it as JSON); returns the exit status.
    With ``--checkpoint`` the model comes from its config.json and the whole model's weights are sized."""
    if args.checkpoint:
        from epruntime.cli.checkpoint_config import generate_config
        from epruntime.io.checkpoint import CheckpointError, CheckpointReader

        try:
            reader = CheckpointReader(args.checkpoint)
            cfg = generate_config(reader, args.config, args.overrides, args.dtype)
            p = make_plan(cfg, args.samples)
            p["checkpoint"] = _checkpoint_section(reader, cfg)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
    else:
        p = make_plan(load_config(args.config, args.overrides), args.samples)
    print(format_plan(p), flush=True)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(p, indent=2))
    return 0
