"""``epruntime bench``: sweep tokens per rank, dispatchers and shared-expert modes, with peers timed
in the same run: transformers' DeepseekV3MoE (eager and grouped_mm experts) on one rank, and a
dense matmul of the expert stage's GEMM shapes as the machine's limit."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import health
from .config import Config
from .dispatch import make_dispatcher
from .job import measure_layer, synthetic_tokens
from .moe import EPMoE
from .runtime import Runtime, init_runtime
from .topology import Topology
from .weights import random_state_dict


@dataclass(frozen=True)
class BenchCase:
    """One point of the sweep."""

    tokens_per_rank: int
    dispatcher: str
    shared_expert: str

    @property
    def label(self) -> str:
        return f"{self.dispatcher}/{self.shared_expert}/{self.tokens_per_rank}"


def median_ms(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def expert_flops(pairs: int, hidden: int, intermediate: int) -> int:
    """FLOPs of the SwiGLU expert stage for ``pairs`` (token, expert) pairs: gate+up and down GEMMs."""
    return 2 * pairs * hidden * 2 * intermediate + 2 * pairs * intermediate * hidden


def dense_rate(
    pairs: int, hidden: int, intermediate: int, dtype: torch.dtype, reps: int, device: torch.device
) -> float:
    """FLOP/s of plain matmuls with the expert stage's GEMM shapes (one weight for all rows): the limit."""
    a = torch.randn(pairs, hidden, device=device).to(dtype)  # [N, H]
    w13 = torch.randn(2 * intermediate, hidden, device=device).to(dtype)  # [2I, H]
    h = torch.randn(pairs, intermediate, device=device).to(dtype)  # [N, I]
    w2 = torch.randn(hidden, intermediate, device=device).to(dtype)  # [H, I]
    ms = median_ms(lambda: (F.linear(a, w13), F.linear(h, w2)), reps, device)
    return expert_flops(pairs, hidden, intermediate) / (ms / 1e3)


def _expert_stage(rt: Runtime, layer: EPMoE, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Achieved FLOP/s of this rank's expert stage against the dense limit, minimum over ranks."""
    result = layer.dispatcher.dispatch(x, *layer.router(x))
    pairs = int(result.tokens_per_expert.sum())
    args = (result.recv_x, result.recv_topk_idx, result.recv_topk_weights, result.tokens_per_expert)
    ms = median_ms(lambda: layer.experts(*args), reps, rt.device)
    inter = layer.experts.intermediate
    achieved = expert_flops(pairs, layer.cfg.hidden_size, inter) / (ms / 1e3) if pairs else 0.0
    limit = dense_rate(max(pairs, 1), layer.cfg.hidden_size, inter, layer.cfg.torch_dtype, reps, rt.device)
    ratio = torch.tensor([achieved / limit if pairs else float("inf")], dtype=torch.float64)
    dist.all_reduce(ratio, op=dist.ReduceOp.MIN)
    return {"expert_gflops": achieved / 1e9, "dense_gflops": limit / 1e9, "fraction_of_dense": ratio.item()}


def _hf_peers(cfg: Config, x: torch.Tensor, ep_ms: float, reps: int) -> dict[str, Any]:
    """One rank: transformers' DeepseekV3MoE on the same weights and tokens, eager and grouped_mm experts."""
    try:
        from .hf_peer import hf_moe
    except ImportError:  # pragma: no cover - transformers is in the dev extra
        return {"skipped": "transformers is not installed (pip install -e '.[dev]')"}
    sd = random_state_dict(cfg.model, cfg.runtime.seed)
    peers: dict[str, Any] = {}
    for impl in ("eager", "grouped_mm"):
        module = hf_moe(cfg.model, sd, cfg.model.torch_dtype, experts_implementation=impl)
        with torch.no_grad():
            ms = median_ms(lambda m=module: m(x.unsqueeze(0)), reps, x.device)
        peers[impl] = {"total_ms": ms, "speedup_of_epruntime": ms / ep_ms}
    best = min(peers.values(), key=lambda p: p["total_ms"])
    peers["speedup_vs_fastest"] = best["speedup_of_epruntime"]
    return peers


def _single_rank_time(rt: Runtime, layer_seed: int, tokens_per_rank: int, reps: int) -> float | None:
    """Rank 0 alone (all cores, all experts) on every rank's tokens; the others wait. None on rank != 0."""
    group = dist.new_group([0])
    ms = None
    if rt.rank == 0:
        cfg = rt.cfg.replace(
            topology=dataclasses.replace(rt.cfg.topology, nnodes=1, ranks_per_node=1),
            runtime=dataclasses.replace(rt.cfg.runtime, moe_tp=1, shared_expert_tp=1),
        )
        one = dataclasses.replace(
            rt,
            cfg=cfg,
            topo=Topology(1, 1, rt.topo.num_experts),
            rank=0,
            world_group=group,
            intra_group=group,
            rail_group=group,
            expert_parallel=None,
        )
        layer = EPMoE.random(cfg.model, one, seed=layer_seed)
        x = torch.cat([synthetic_tokens(rt.cfg, r, tokens_per_rank) for r in range(rt.world_size)]).to(rt.device)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            ms = median_ms(lambda: layer(x), reps, rt.device)
        finally:
            torch.set_num_threads(threads)
    dist.barrier()
    return ms


def bench_cases(rt: Runtime, cases: list[BenchCase], reps: int, progress: Callable[[str], None]) -> list[dict]:
    """Measure every case (all ranks together); returns one record per case."""
    cfg = rt.cfg
    layer = EPMoE.random(cfg.model, rt, seed=cfg.runtime.seed)
    records = []
    for case in cases:
        progress(case.label)
        layer.dispatcher = make_dispatcher(layer.parallel.ep, case.dispatcher)
        layer.shared_mode = case.shared_expert
        x = synthetic_tokens(cfg, rt.rank // cfg.runtime.moe_tp, case.tokens_per_rank).to(rt.device)
        stats, _ = measure_layer(layer, x, cfg.runtime.warmup, reps)
        record = {"case": case.__dict__ | {"label": case.label}, **stats, **_expert_stage(rt, layer, x, reps)}
        if rt.world_size == 1:
            record["peers"] = _hf_peers(cfg, x, stats["timing_ms"]["total"], reps)
        records.append(record)
    return records


def bench_main(
    cfg: Config,
    tokens: list[int],
    dispatchers: list[str],
    shared: list[str],
    reps: int,
    json_path: str,
    plot_path: str | None,
    single_rank_baseline: bool,
) -> int:
    """Entry point of ``epruntime bench`` in each rank; rank 0 prints, writes JSON and the plot."""
    from .bench_report import format_bench, plot_bench, progress_bar

    rt = init_runtime(cfg)
    cases = [BenchCase(*c) for c in itertools.product(tokens, dispatchers, shared)]
    bar = progress_bar(len(cases), enabled=rt.rank == 0)
    records = health.run_or_exit(lambda: bench_cases(rt, cases, reps, bar))
    bar.close()
    report: dict[str, Any] = {
        "world_size": rt.world_size,
        "nnodes": rt.topo.nnodes,
        "ranks_per_node": rt.topo.ranks_per_node,
        "dtype": cfg.model.dtype,
        "reps": reps,
        "threads_per_rank": torch.get_num_threads(),
        "cases": records,
    }
    if single_rank_baseline and rt.world_size > 1:
        baseline = {t: _single_rank_time(rt, cfg.runtime.seed, t, reps) for t in tokens}
        if rt.rank == 0:
            for record in records:
                one = baseline[record["case"]["tokens_per_rank"]]
                record["single_rank_ms"] = one
                record["ratio_to_single_rank"] = record["timing_ms"]["total"] / one
    if rt.rank == 0:
        print(format_bench(report), flush=True)
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        if plot_path:
            print(plot_bench(report, plot_path), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0
