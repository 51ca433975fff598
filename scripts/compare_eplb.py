"""Balance of expert placements: contiguous (no redundant experts), DeepSeek's EPLB and ``epruntime.eplb``.

For Zipf(1.0) loads (uncapped, and capped at 1/8, the most an expert can take under top-8 routing) and
lognormal(sigma=1) loads over 256 experts (58 layers, several seeds) at DeepSeek-V3 layouts
(EP32: 288 slots on 4 nodes x 8 GPUs, hierarchical; EP72 and EP144: 288 slots on 9 or 18 nodes, global since 8 groups
do not divide over them; EP8: 288 slots on one node of 8 GPUs), it prints the median and max over layers of the
per-GPU load's max over mean (1.0 is perfect). Contiguous has no meaning with redundant slots, so its column is the
layout with ``P = E`` (256 slots) on the same GPUs, where 256 divides over them. DeepSeek's eplb.py is not part of
this project: fetch it yourself and pass its path.

    python scripts/compare_eplb.py --deepseek /tmp/deepseek_eplb/eplb.py
    python scripts/compare_eplb.py --deepseek /tmp/deepseek_eplb/eplb.py --seeds 5 --json out/eplb.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from epruntime.eplb import balance, contiguous_placement, lognormal_load, rebalance_experts, zipf_load

# name: (num_replicas, num_groups, num_nodes, num_gpus), for 256 routed experts in 8 groups
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "EP32": (288, 8, 4, 32),
    "EP72": (288, 8, 9, 72),
    "EP144": (288, 8, 18, 144),
    "EP8": (288, 8, 1, 8),
}
LOADS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    "zipf1.0": lambda layers, experts, seed: zipf_load(layers, experts, 1.0, seed),
    "zipf1.0cap": lambda layers, experts, seed: zipf_load(layers, experts, 1.0, seed, cap=1 / 8),
    "lognormal1": lambda layers, experts, seed: lognormal_load(layers, experts, 1.0, seed),
}
RebalanceFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def load_deepseek(path: Path) -> RebalanceFn:
    """DeepSeek's ``rebalance_experts``, imported from the eplb.py at ``path``."""
    if not path.is_file():
        raise SystemExit(f"--deepseek {path}: no such file; fetch github.com/deepseek-ai/EPLB and pass its eplb.py")
    spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--deepseek {path}: cannot import it as a Python module")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rebalance_experts


def doubled(phy2log: torch.Tensor, num_gpus: int) -> int:
    """How many (layer, GPU, expert) triples hold more than one replica of the expert on that GPU."""
    per_gpu = phy2log.view(phy2log.shape[0], num_gpus, -1).sort(-1).values  # [L, G, P/G]
    return int((per_gpu[..., 1:] == per_gpu[..., :-1]).sum())


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Median and max of a ``[L]`` balance tensor."""
    return {"median": float(values.median()), "max": float(values.max())}


def run_case(
    deepseek: RebalanceFn, weight: torch.Tensor, shape: tuple[int, int, int, int]
) -> dict[str, dict[str, float] | None]:
    """Balance of the three placements for one load ``weight [L, E]`` at one shape."""
    num_replicas, num_groups, num_nodes, num_gpus = shape
    num_layers, num_experts = weight.shape
    out: dict[str, dict[str, float] | None] = {"contiguous": None}
    if num_experts % num_gpus == 0:
        flat = contiguous_placement(num_layers, num_experts, num_experts)  # [L, E]
        ones = torch.ones(num_layers, num_experts, dtype=torch.int64)  # [L, E]
        out["contiguous"] = summarize(balance(weight, flat, ones, num_gpus))
    for name, fn in (("deepseek", deepseek), ("ours", rebalance_experts)):
        start = time.perf_counter()
        phy2log, _, logcnt = fn(weight, num_replicas, num_groups, num_nodes, num_gpus)
        seconds = time.perf_counter() - start
        stats = summarize(balance(weight, phy2log.long(), logcnt.long(), num_gpus))
        stats.update(seconds=seconds, doubled=doubled(phy2log.long(), num_gpus))
        out[name] = stats
    return out


def fmt(stats: dict[str, float] | None, key: str) -> str:
    """One table cell."""
    return "n/a" if stats is None else f"{stats[key]:.4f}"


def print_table(rows: list[dict]) -> None:
    """The per-(shape, load, seed) table, then one line per (shape, load) over all seeds."""
    head = (
        f"{'shape':6} {'load':11} {'seed':>4} | {'contig med':>10} {'max':>7} | {'DeepSeek med':>12} {'max':>7} | "
        f"{'ours med':>8} {'max':>7} | {'dbl DS/ours':>11} | {'s DS/ours':>11}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        c, d, o = row["contiguous"], row["deepseek"], row["ours"]
        print(
            f"{row['shape']:6} {row['load']:11} {row['seed']!s:>4} | {fmt(c, 'median'):>10} {fmt(c, 'max'):>7} | "
            f"{fmt(d, 'median'):>12} {fmt(d, 'max'):>7} | {fmt(o, 'median'):>8} {fmt(o, 'max'):>7} | "
            f"{d['doubled']:>5}/{o['doubled']:<5} | {d['seconds']:>5.2f}/{o['seconds']:<5.2f}"
        )


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (shape, load): the median of the per-seed medians and the max of the per-seed maxima."""
    out = []
    keys = sorted({(r["shape"], r["load"]) for r in rows}, key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for shape, load in keys:
        group = [r for r in rows if r["shape"] == shape and r["load"] == load]
        agg: dict = {"shape": shape, "load": load, "seed": "all"}
        for name in ("contiguous", "deepseek", "ours"):
            if group[0][name] is None:
                agg[name] = None
                continue
            agg[name] = {
                "median": statistics.median(r[name]["median"] for r in group),
                "max": max(r[name]["max"] for r in group),
            }
            if name != "contiguous":
                agg[name]["seconds"] = statistics.median(r[name]["seconds"] for r in group)
                agg[name]["doubled"] = sum(r[name]["doubled"] for r in group)
        out.append(agg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepseek", type=Path, required=True, help="path to DeepSeek's eplb.py")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per load (0, 1, ...)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3: 58)")
    parser.add_argument("--experts", type=int, default=256, help="routed experts (DeepSeek-V3: 256)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; pick from {list(SHAPES)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    deepseek = load_deepseek(args.deepseek)

    rows = []
    for shape in shapes:
        for load, make in LOADS.items():
            for seed in range(args.seeds):
                weight = make(args.layers, args.experts, seed)  # [L, E]
                rows.append({"shape": shape, "load": load, "seed": seed, **run_case(deepseek, weight, SHAPES[shape])})
    summary = aggregate(rows)
    print("max/mean of per-GPU load (median and max over layers); dbl = GPU-expert pairs with two or more replicas")
    print_table(rows)
    print()
    print("over all seeds: median of the per-seed medians, max of the maxima")
    print_table(summary)
    worse = [r for r in rows if r["ours"]["max"] > r["deepseek"]["max"] * (1 + 1e-9)]
    worse += [r for r in rows if r["ours"]["median"] > r["deepseek"]["median"] * (1 + 1e-9)]
    print(f"\ncases where ours is less balanced than DeepSeek's (median or max): {len(worse)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fields = ("replicas", "groups", "nodes", "gpus")
        shapes_json = {name: dict(zip(fields, SHAPES[name], strict=True)) for name in shapes}
        payload = {"layers": args.layers, "experts": args.experts, "shapes": shapes_json, "rows": rows}
        payload["summary"] = summary
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
