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
from .cpu_alloc import glibc_default_malloc
from .dispatch import make_dispatcher
from .job import measure_layer, synthetic_tokens
from .moe import EPMoE
from .runtime import Runtime, end_rank, init_runtime
from .topology import Topology
from .weights import random_state_dict

PEERS = ("eager", "grouped_mm")  # transformers' experts implementations


@dataclass(frozen=True)
class BenchCase:
    """One point of the sweep."""

    tokens_per_rank: int
    dispatcher: str
    shared_expert: str

    @property
    def label(self) -> str:
        return f"{self.dispatcher}/{self.shared_expert}/{self.tokens_per_rank}"


def _time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], reps: int, device: torch.device, block: int = 3
) -> dict[str, float]:
    """Median ms of each function over ``reps`` timed calls, taken in turns of ``block`` calls, each
    turn after one untimed call: a slow spell of a shared machine hits every contender alike, and
    each finds its caches and heap as it left them."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    while min(len(t) for t in samples.values()) < reps:
        for name, fn in fns.items():
            fn()
            samples[name] += [_time_ms(fn, device) for _ in range(min(block, reps - len(samples[name])))]
    return {name: statistics.median(times) for name, times in samples.items()}


def median_ms(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call."""
    return interleaved_medians({"fn": fn}, reps, device)["fn"]


def expert_flops(pairs: int, hidden: int, intermediate: int) -> int:
    """FLOPs of the SwiGLU expert stage for ``pairs`` (token, expert) pairs: gate+up and down GEMMs."""
    return 2 * pairs * hidden * 2 * intermediate + 2 * pairs * intermediate * hidden


def _dense_gemms(pairs: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> Callable[[], Any]:
    """Plain matmuls with the expert stage's GEMM shapes (one weight for all rows): the machine's limit."""
    a = torch.randn(pairs, hidden, device=device).to(dtype)  # [N, H]
    w13 = torch.randn(2 * inter, hidden, device=device).to(dtype)  # [2I, H]
    h = torch.randn(pairs, inter, device=device).to(dtype)  # [N, I]
    w2 = torch.randn(hidden, inter, device=device).to(dtype)  # [H, I]
    return lambda: (F.linear(a, w13), F.linear(h, w2))


def _expert_stage(rt: Runtime, layer: EPMoE, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Achieved FLOP/s of this rank's expert stage against dense GEMMs of the same shapes, timed
    interleaved; the fraction is the minimum over ranks."""
    result = layer.dispatcher.dispatch(x, *layer.router(x))
    pairs, hidden, inter = int(result.tokens_per_expert.sum()), layer.cfg.hidden_size, layer.experts.intermediate
    args = (result.recv_x, result.recv_topk_idx, result.recv_topk_weights, result.tokens_per_expert)
    dense = _dense_gemms(max(pairs, 1), hidden, inter, layer.cfg.torch_dtype, rt.device)
    ms = interleaved_medians({"experts": lambda: layer.experts(*args), "dense": dense}, reps, rt.device)
    flops = expert_flops(pairs, hidden, inter)
    achieved, limit = flops / (ms["experts"] / 1e3), expert_flops(max(pairs, 1), hidden, inter) / (ms["dense"] / 1e3)
    ratio = torch.tensor([achieved / limit if pairs else float("inf")], dtype=torch.float64)
    dist.all_reduce(ratio, op=dist.ReduceOp.MIN)
    return {"expert_gflops": achieved / 1e9, "dense_gflops": limit / 1e9, "fraction_of_dense": ratio.item()}


def _hf_peers(cfg: Config, layer: EPMoE, x: torch.Tensor, reps: int) -> dict[str, Any]:
    """One rank: transformers' DeepseekV3MoE on the same weights and tokens, eager and grouped_mm
    experts, timed interleaved with the EP layer; speedups are ratios of medians from this run. The
    peers run under glibc's default malloc settings, as they would in their own process (epruntime's
    heap-kept buffers, :mod:`epruntime.cpu_alloc`, are part of what is measured)."""
    try:
        from .hf_peer import hf_moe
    except ImportError:  # pragma: no cover - transformers is in the dev extra
        return {"skipped": "transformers is not installed (pip install -e '.[models]')"}
    sd = random_state_dict(cfg.model, cfg.runtime.seed)
    modules = {impl: hf_moe(cfg.model, sd, cfg.model.torch_dtype, experts_implementation=impl) for impl in PEERS}
    fns = {"epruntime": lambda: layer(x)}
    for impl, module in modules.items():  # as transformers runs in a process of its own: default malloc

        def peer(m: torch.nn.Module = module) -> None:
            with glibc_default_malloc():
                m(x.unsqueeze(0))

        fns[impl] = peer
    with torch.no_grad():
        ms = interleaved_medians(fns, reps, x.device)
    peers: dict[str, Any] = {"epruntime_ms": ms["epruntime"]}
    for impl in PEERS:
        peers[impl] = {"total_ms": ms[impl], "speedup_of_epruntime": ms[impl] / ms["epruntime"]}
    peers["speedup_vs_fastest"] = min(ms[impl] for impl in PEERS) / ms["epruntime"]
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
            record["peers"] = _hf_peers(cfg, layer, x, reps)
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
    end_rank(0)
