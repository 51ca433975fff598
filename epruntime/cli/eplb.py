"""``epruntime eplb``: a balanced expert placement (a ``runtime.placement`` file) from a recorded expert load.

The load file is what ``run --expert-load`` writes: JSON ``{"load": [[...], ...]}``, one row of (token, expert)
pair counts per MoE layer (one row for a standalone layer or for every layer), one column per logical expert.
The placement is :func:`~epruntime.layer.rebalance_experts` over the EP world (``world / moe_tp`` ranks) with
``E + runtime.redundant_experts`` slots: hierarchical when ``model.n_group`` divides over the nodes, global
otherwise. With ``model.max_nodes_per_token`` set, routing picks nodes by contiguous blocks of logical experts, so
each node's block is placed on that node's slots alone (one node per call), and every replica stays home.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from epruntime.config.placement_file import read_rows
from epruntime.config.schema import Config, ConfigError, load_config
from epruntime.eplb import balance, contiguous_placement, logical_maps, rebalance_experts

LOAD_FIX = "record one with `epruntime launch --config YAML --expert-load LOAD.json`"
PLACED = ("runtime.placement=contiguous", "runtime.rebalance_every=1")  # see placement_config


def read_expert_load(path: str, num_experts: int, num_layers: int | None = None) -> torch.Tensor:  # [L, E]
    """The load file's rows as float64 ``[L, E]``, checked: ``num_experts`` counts >= 0 per row, and 1 or
    ``num_layers`` rows when the model's MoE layer count is known."""
    where = f"--expert-load {path}"
    rows = read_rows(path, "load", where, LOAD_FIX)
    for i, row in enumerate(rows):
        if len(row) != num_experts:
            raise ConfigError(
                f"{where}: row {i} has {len(row)} experts but model.n_routed_experts is {num_experts}; record the "
                f"load with this model's config (or pass the config it was recorded with)"
            )
        bad = [v for v in row if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0]
        if bad:
            raise ConfigError(f"{where}: row {i} holds {bad[0]!r}; loads are (token, expert) pair counts >= 0")
    if num_layers is not None and len(rows) not in (1, num_layers):
        raise ConfigError(
            f"{where}: {len(rows)} rows for a model of {num_layers} MoE layers; record one row per MoE layer in "
            f"model order, or a single row for all"
        )
    return torch.tensor(rows, dtype=torch.float64)


def placement_config(load: Callable[[list[str]], Config], overrides: list[str]) -> Config:
    """The config a placement is made for, from ``load(overrides)``. Running rejects ``runtime.redundant_experts
    > 0`` with no placement file (the slots would hold nothing useful); that is the config this command exists for,
    so when the config does not load as given it is loaded again with the placement left contiguous and online
    rebalancing on, which lifts that one check (any other error is raised again)."""
    try:
        return load(overrides)
    except ConfigError:
        return load([*overrides, *PLACED])


@dataclass(frozen=True)
class SlotShape:
    """What a placement is made for: ``experts`` logical experts on ``slots`` slots over ``ep_world`` EP ranks in
    ``nodes`` nodes, ``groups`` expert groups; ``node_limited``: replicas must stay on their block's node."""

    experts: int
    slots: int
    groups: int
    nodes: int
    ep_world: int
    node_limited: bool

    @classmethod
    def of(cls, cfg: Config) -> SlotShape:
        m, topo, run = cfg.model, cfg.topology, cfg.runtime
        e = m.n_routed_experts
        ep_world = topo.world_size // run.moe_tp
        return cls(e, e + run.redundant_experts, m.n_group, topo.nnodes, ep_world, m.max_nodes_per_token is not None)

    @property
    def ranks_per_node(self) -> int:
        return self.ep_world // self.nodes

    @property
    def redundant(self) -> int:
        return self.slots - self.experts

    def policy(self, hierarchical: bool = True) -> str:
        """The policy ``place`` applies, in words."""
        if self.node_limited:
            return "per node (model.max_nodes_per_token keeps replicas on their node)"
        if hierarchical and self.groups % self.nodes == 0:
            return "hierarchical"
        return "global" if not hierarchical else f"global (model.n_group={self.groups} does not divide over nodes)"


def place(load: torch.Tensor, shape: SlotShape, hierarchical: bool = True) -> torch.Tensor:  # [L, E] -> [L, P]
    """``phy2log [L, P]`` for ``load [L, E]``: :func:`rebalance_experts` over the whole EP world (``hierarchical``
    False forces the global policy: one group, one node), or node by node when replicas must stay home."""
    if not shape.node_limited:
        groups, nodes = (shape.groups, shape.nodes) if hierarchical else (1, 1)
        return rebalance_experts(load, shape.slots, groups, nodes, shape.ep_world)[0]
    n = shape.nodes
    experts, slots, ranks = shape.experts // n, shape.slots // n, shape.ep_world // n  # per node
    groups = shape.groups // n if hierarchical and shape.groups % n == 0 else 1
    blocks = [
        rebalance_experts(load[:, i * experts : (i + 1) * experts], slots, groups, 1, ranks)[0] + i * experts
        for i in range(n)
    ]  # n x [L, P / n], global logical ids
    return torch.cat(blocks, dim=1)


def predicted_balance(load: torch.Tensor, phy2log: torch.Tensor, ep_world: int) -> dict[str, Any]:
    """Busiest EP rank over the mean per layer (each expert's load split evenly over its replicas): median, max
    and every layer's."""
    _, logcnt = logical_maps(phy2log, load.shape[1])
    per_layer = balance(load, phy2log, logcnt, ep_world)  # [L]
    return {"median": float(per_layer.median()), "max": float(per_layer.max()), "per_layer": per_layer.tolist()}


def contiguous_balance(load: torch.Tensor, shape: SlotShape) -> dict[str, Any] | None:
    """:func:`predicted_balance` of today's layout (slot ``p`` holds expert ``p``, no redundant slots), or None
    when the experts do not divide over the EP world."""
    if shape.experts % shape.ep_world:
        return None
    return predicted_balance(load, contiguous_placement(len(load), shape.experts, shape.experts), shape.ep_world)


def format_balance(b: dict[str, Any] | None) -> str:
    """``median x, max y`` (or n/a)."""
    return "n/a" if b is None else f"median {b['median']:.3f}, max {b['max']:.3f}"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def format_comparison(c: dict[str, Any]) -> list[str]:
    """The ``--expert-load`` lines of ``epruntime plan``."""
    lines = [
        f"placements for {c['path']} ({c['layers']} layer(s)): {c['slots']} slots ({c['redundant_experts']} "
        f"redundant) over {c['ep_world']} EP ranks; busiest rank / mean, median and max over layers",
        f"  {'placement':<14}{'load file':>15}{'sampled routes':>18}   inter-node B/token: flat  hierarchical   policy",
    ]
    for name, r in c["placements"].items():
        b, routed, per_token = r["max_over_mean"], r["routed_max_over_mean"], r["inter_node_bytes_per_token"]
        lines.append(
            f"  {name:<14}{b['median']:>8.3f}{b['max']:>7.3f}{routed['median']:>11.3f}{routed['max']:>7.3f}"
            f"{per_token.get('flat', 0):>25,.0f}{per_token.get('hierarchical', 0):>14,.0f}   {r['policy']}"
        )
    lines += [
        "  load file: each expert's load split evenly over its replicas (the placement's own model);",
        "  sampled routes: random tokens through the synthetic gate `run` uses (runtime.seed, runtime.routing_skew),",
        "  mapped to slots by replica choice: pairs received per rank, and inter-node bytes (mean over layers)",
    ]
    extra = c["redundant_experts"] / c["ep_world"]
    scope = f"{c['moe_layers']} MoE layers" if c["moe_layers"] else "per MoE layer"
    lines.append(
        f"  each redundant expert: {_size(c['bytes_per_redundant_expert'])} per MoE layer on the rank holding "
        f"it; {c['redundant_experts']} over {c['ep_world']} ranks: {extra:g} per rank = "
        f"{_size(c['redundant_bytes_per_rank'])} per rank ({scope})"
    )
    return lines


def make_placement(cfg: Config, load_path: str) -> dict[str, Any]:
    """The placement file's content: ``phy2log`` and, for the user, what it was made from and its predicted
    balance against contiguous (n/a with redundant slots, which contiguous has no use for)."""
    shape = SlotShape.of(cfg)
    load = read_expert_load(load_path, shape.experts)  # [L, E]
    phy2log = place(load, shape)  # [L, P]
    ours = predicted_balance(load, phy2log, shape.ep_world)
    contiguous = contiguous_balance(load, shape) if shape.redundant == 0 else None
    return {
        "phy2log": phy2log.tolist(),
        "expert_load": load_path,
        "layers": len(load),
        "experts": shape.experts,
        "redundant_experts": shape.redundant,
        "slots": shape.slots,
        "ep_world": shape.ep_world,
        "nnodes": shape.nodes,
        "policy": shape.policy(),
        "predicted_max_over_mean": {"eplb": ours, "contiguous": contiguous},
    }


def format_placement(p: dict[str, Any], out: str) -> str:
    """What ``epruntime eplb`` prints."""
    predicted = p["predicted_max_over_mean"]
    why = " (runtime.redundant_experts > 0: see `epruntime plan --expert-load` for R = 0)" if p["slots"] > p[
        "experts"] else ""  # fmt: skip
    return "\n".join(
        [
            f"epruntime eplb: {p['layers']} layer(s) x {p['experts']} experts -> {p['slots']} slots "
            f"({p['redundant_experts']} redundant) over {p['ep_world']} EP ranks on {p['nnodes']} node(s), "
            f"{p['policy']}",
            "predicted busiest rank / mean over layers (each expert's load split evenly over its replicas):",
            f"  eplb        {format_balance(predicted['eplb'])}",
            f"  contiguous  {format_balance(predicted['contiguous'])}{why}",
            f"placement written to {out}; run with --set runtime.redundant_experts={p['redundant_experts']} "
            f"--set runtime.placement={out}",
        ]
    )


def eplb_main(args: argparse.Namespace) -> int:
    """Entry point of ``epruntime eplb``: write the placement, check it loads as a config, print the summary."""
    cfg = placement_config(lambda overrides: load_config(args.config, overrides), args.overrides)
    p = make_placement(cfg, args.expert_load)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(p) + "\n")
    # the rerun's config, with the placement checks of any launch (node limits included)
    load_config(args.config, [*args.overrides, f"runtime.redundant_experts={p['redundant_experts']}",
                              f"runtime.placement={out}"])  # fmt: skip
    print(format_placement(p, str(out)), flush=True)
    return 0
