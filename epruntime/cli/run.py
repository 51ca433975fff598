"""``epruntime run``: time the EP layer on synthetic weights and tokens, optionally verify it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epruntime.cli.instruments import STAGES
from epruntime.cli.shared_modes import compare_shared_modes, format_shared_modes
from epruntime.config.schema import Config, config_to_dict
from epruntime.dispatch import traffic_report
from epruntime.io.weights import random_state_dict
from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel import health
from epruntime.parallel.runtime import Runtime, end_rank, init_runtime

TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}


def synthetic_tokens(cfg: Config, rank: int, num_tokens: int | None = None) -> torch.Tensor:
    """This rank's ``[T, H]`` activations, reproducible from ``runtime.seed`` and the rank."""
    t = cfg.runtime.tokens_per_rank if num_tokens is None else num_tokens
    gen = torch.Generator().manual_seed(cfg.runtime.seed * 7919 + rank + 1)
    return torch.randn(t, cfg.model.hidden_size, generator=gen).to(cfg.model.torch_dtype)


def _reduce(values: list[float], op: dist.ReduceOp, dtype: torch.dtype = torch.float64) -> list[float]:
    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=op)
    return t.tolist()


def verify_output(rt: Runtime, layer_seed: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Compare every rank's output with the single-process reference; normwise error over all ranks."""
    sd = random_state_dict(rt.cfg.model, layer_seed)
    ref = reference_moe(x.cpu(), sd, rt.cfg.model, rt.topo.experts_per_node)  # [T, H] fp32, on the host
    err = (y.float().cpu() - ref).abs().max().item() if len(ref) else 0.0
    scale = ref.abs().max().item() if len(ref) else 0.0
    err, scale = _reduce([err, scale], dist.ReduceOp.MAX)
    rel = err / max(scale, 1e-30)
    tol = TOLERANCE[rt.cfg.model.dtype]
    return {"max_abs_err": err, "max_rel_err": rel, "tolerance": tol, "ok": rel <= tol}


def measure_layer(
    layer: EPMoE,
    x: torch.Tensor,
    warmup: int,
    iters: int,
    between: Callable[[int], None] | None = None,
    block: int = 3,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm up, time ``iters`` forwards; stage medians of the slowest rank, host CPU per stage summed over
    ranks, traffic per layer, tokens/s.

    Every rank must call it; every rank gets the same figures, and its own last output. ``between(n)``,
    when given, runs before each block of ``block`` timed forwards (a contender timed in turns with
    this layer, ``n`` calls per turn), and is followed by one untimed forward: each side of a turn
    starts with one call that finds the caches the other side left.
    """
    tp = layer.parallel.tp_size  # the ranks of one expert-TP group share their tokens
    for _ in range(warmup):
        layer(x)
    layer.timer.reset()
    layer.dispatcher.traffic.reset()
    calls = iters
    for i in range(iters):
        if between is not None and i % block == 0:
            between(min(block, iters - i))
            with layer.timer.paused():
                layer(x)
            calls += 1
        y = layer(x)
    medians = layer.timer.medians_ms()
    slowest = dict(zip(STAGES, _reduce([medians[s] for s in STAGES], dist.ReduceOp.MAX), strict=True))
    cpu = layer.timer.cpu_medians_ms()
    cpu_all_ranks = dict(zip(STAGES, _reduce([cpu[s] for s in STAGES], dist.ReduceOp.SUM), strict=True))
    traffic = layer.dispatcher.traffic.as_tensor()
    dist.all_reduce(traffic)
    total_tokens = int(_reduce([float(x.shape[0])], dist.ReduceOp.SUM)[0]) // tp
    report = traffic_report(torch.div(traffic, calls, rounding_mode="floor"))
    stats = {
        "dispatcher": layer.dispatcher.name,
        "shared_expert": layer.shared_mode,
        "total_tokens": total_tokens,
        "timing_ms": slowest,
        "cpu_ms_all_ranks": cpu_all_ranks,
        "throughput_tokens_per_s": total_tokens / (slowest["total"] / 1e3) if slowest["total"] else 0.0,
        "traffic_bytes": report,
        "traffic_bytes_per_token": {link: report[link] / max(total_tokens, 1) for link in ("intra_node", "inter_node")},
    }
    return stats, y


def run_layer(rt: Runtime, verify: bool, shared_modes: bool = False) -> dict[str, Any]:
    """Time ``runtime.iters`` forwards on synthetic weights and tokens and gather the summary (every rank)."""
    cfg = rt.cfg
    layer = EPMoE.random(cfg.model, rt, seed=cfg.runtime.seed)
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
    if "shared_modes" in s:
        lines.append(format_shared_modes(s["shared_modes"]))
    if "verify" in s:
        v = s["verify"]
        verdict = "ok" if v["ok"] else "FAILED"
        lines.append(f"verify: {verdict} (max rel err {v['max_rel_err']:.2e}, tolerance {v['tolerance']:.0e})")
    return "\n".join(lines)


def run_main(cfg: Config, verify: bool, json_path: str | None, shared_modes: bool = False) -> int:
    """Entry point of ``epruntime run`` inside a launched rank; returns the exit status."""
    rt = init_runtime(cfg)
    rt.log(
        f"node {rt.node} local {rt.local_index}, experts {rt.topo.expert_range(rt.rank)}, "
        f"launcher {rt.launcher}, pid {os.getpid()}"
    )
    summary = health.run_or_exit(lambda: run_layer(rt, verify, shared_modes))
    if rt.rank == 0:
        print(format_summary(summary), flush=True)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(summary, indent=2))
    end_rank()
    return 0 if summary.get("verify", {}).get("ok", True) else 1
