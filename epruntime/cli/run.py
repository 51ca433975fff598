"""``epruntime run``: time the EP layer on synthetic weights and tokens, optionally verify it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from epruntime.cli.heatmap import write_expert_load
from epruntime.cli.measure import measure_layer, synthetic_tokens, verify_output
from epruntime.cli.shared_modes import compare_shared_modes, format_shared_modes
from epruntime.config.schema import Config, config_to_dict
from epruntime.layer.moe import EPMoE
from epruntime.layer.probe import STAGES, StageMarks
from epruntime.parallel import health
from epruntime.parallel.runtime import Runtime, end_rank, init_runtime


def run_layer(rt: Runtime, verify: bool, shared_modes: bool = False) -> dict[str, Any]:
    """Time ``runtime.iters`` forwards on synthetic weights and tokens and gather the summary (every rank);
    ``expert_load`` holds the pairs per logical expert over the timed forwards, summed over the EP world."""
    cfg = rt.cfg
    layer = EPMoE.random(cfg.model, rt, seed=cfg.runtime.seed)
    layer.probe = StageMarks()  # failures name the stage; measure_layer times the loop
    x = synthetic_tokens(cfg, rt.rank // cfg.runtime.moe_tp).to(rt.device)
    stats, y = measure_layer(layer, x, cfg.runtime.warmup, cfg.runtime.iters)
    summary: dict[str, Any] = {
        "world_size": rt.world_size,
        "nnodes": rt.topo.nnodes,
        "ranks_per_node": rt.topo.ranks_per_node,
        "dtype": cfg.model.dtype,
        "tokens_per_rank": cfg.runtime.tokens_per_rank,
        "iters": cfg.runtime.iters,
        **stats,
        "config": config_to_dict(cfg),
    }
    if layer.rebalancer is not None:
        summary["rebalance"] = layer.rebalancer.events
    if shared_modes:
        summary["shared_modes"] = compare_shared_modes(layer, x, cfg.runtime.iters)
    if verify:
        summary["verify"] = verify_output(rt, cfg.runtime.seed, x, y)
    return summary


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def format_summary(s: dict[str, Any]) -> str:
    """The rank-0 summary as printed by ``epruntime run``."""
    lines = [
        f"epruntime run: {s['world_size']} ranks = {s['nnodes']} nodes x {s['ranks_per_node']} | "
        f"dispatcher {s['dispatcher']} | {s['tokens_per_rank']} tokens/rank | {s['dtype']} | {s['iters']} iters",
        "stage      median ms (slowest rank)   host CPU ms (all ranks)",
    ]
    lines += [f"  {stage:<9}{s['timing_ms'][stage]:10.3f}{s['cpu_ms_all_ranks'][stage]:26.1f}" for stage in STAGES]
    lines.append(f"throughput {s['throughput_tokens_per_s']:,.0f} tokens/s ({s['total_tokens']} tokens per layer)")
    t = s["traffic_bytes"]
    for phase in ("dispatch", "combine"):
        p = t[phase]
        lines.append(
            f"{phase:<9}  intra-node {_mb(p['intra_node'])}  inter-node {_mb(p['inter_node'])}  "
            f"metadata {_mb(p['metadata'])}  (per layer, all ranks)"
        )
    per_token = s["traffic_bytes_per_token"]
    lines.append(
        f"per token  intra-node {per_token['intra_node']:,.0f} B  inter-node {per_token['inter_node']:,.0f} B  "
        f"(dispatch + combine payload)"
    )
    if "expert_balance" in s:
        b = s["expert_balance"]
        pairs = ", ".join(f"{n:,.0f}" for n in b["recv_pairs_per_rank"])
        lines.append(f"expert load: busiest rank / mean {b['max_over_mean']:.3f}  (pairs per rank per call: {pairs})")
    for event in s.get("rebalance", []):
        lines.append("rebalance: " + ", ".join(f"{k} {v}" for k, v in event.items()))
    if "shared_modes" in s:
        lines.append(format_shared_modes(s["shared_modes"]))
    if "verify" in s:
        v = s["verify"]
        verdict = "ok" if v["ok"] else "FAILED"
        lines.append(f"verify: {verdict} (max rel err {v['max_rel_err']:.2e}, tolerance {v['tolerance']:.0e})")
    return "\n".join(lines)


def run_main(
    cfg: Config, verify: bool, json_path: str | None, shared_modes: bool = False, expert_load: str | None = None
) -> int:
    """Entry point of ``epruntime run`` inside a launched rank; returns the exit status. ``expert_load``: write
    the load per logical expert (one row: a standalone layer) there, with a heatmap beside it."""
    rt = init_runtime(cfg)
    rt.log(f"{rt.layout.describe()}, launcher {rt.launcher}, pid {os.getpid()}")
    summary = health.run_or_exit(lambda: run_layer(rt, verify, shared_modes))
    load = summary.pop("expert_load")  # [E]
    if rt.rank == 0:
        print(format_summary(summary), flush=True)
        if expert_load:
            calls = cfg.runtime.iters
            for line in write_expert_load(expert_load, [load], calls=calls, world_size=rt.world_size):
                print(line, flush=True)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(summary, indent=2))
    end_rank(rt)
    return 0 if summary.get("verify", {}).get("ok", True) else 1
