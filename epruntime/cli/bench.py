"""``epruntime bench``: sweep tokens per rank, dispatchers and shared-expert modes, with peers timed
in the same run: transformers' DeepseekV3MoE (eager and grouped_mm experts) on one rank, and a
dense matmul of the expert stage's GEMM shapes as the machine's limit."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from epruntime.cli.measure import interleaved_medians, measure_layer, synthetic_tokens
from epruntime.cli.single_rank import SingleRankBaseline
from epruntime.config.schema import Config
from epruntime.dispatch.registry import make_dispatcher
from epruntime.io.weights import random_state_dict
from epruntime.layer.moe import EPMoE
from epruntime.layer.probe import StageMarks
from epruntime.parallel import health
from epruntime.parallel.cpu_alloc import glibc_default_malloc
from epruntime.parallel.runtime import Runtime, end_rank, init_runtime

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
    """Achieved FLOP/s of this rank's expert stage (through ``experts.run``, the entry the layer uses, so
    every dispatch layout is benched) against dense GEMMs of the same (token, expert) pairs, timed
    interleaved. Ranks take turns (the others wait at a barrier), so that no rank's figure is another
    rank's load; the fraction is the minimum over ranks."""
    received = layer.dispatcher.dispatch(x, *layer.router(x))
    pairs, hidden, inter = received.num_pairs(), layer.cfg.hidden_size, layer.experts.intermediate
    dense = _dense_gemms(max(pairs, 1), hidden, inter, layer.cfg.torch_dtype, rt.device)
    for turn in range(rt.world_size):
        if turn == rt.rank:
            stage = {"experts": lambda: layer.experts.run(received), "dense": dense}
            ms = interleaved_medians(stage, reps, rt.device)
        dist.barrier()
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
        from epruntime.layer.hf_peer import hf_moe
    except ImportError:  # pragma: no cover - transformers is in the dev extra
        return {"skipped": "transformers is not installed (pip install -e '.[models]')"}
    sd = random_state_dict(cfg.model, cfg.runtime.seed)
    dtype = cfg.model.torch_dtype
    modules = {impl: hf_moe(cfg.model, sd, dtype, experts_implementation=impl).to(x.device) for impl in PEERS}
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


def bench_cases(
    rt: Runtime, cases: list[BenchCase], reps: int, progress: Callable[[str], None], single_rank_baseline: bool = False
) -> list[dict]:
    """Measure every case (all ranks together); returns one record per case. With ``single_rank_baseline``
    (and more than one rank) each case's timed forwards alternate with rank 0 alone on the same work."""
    cfg = rt.cfg
    layer = EPMoE.random(cfg.model, rt, seed=cfg.runtime.seed)
    layer.probe = StageMarks()
    records = []
    for case in cases:
        progress(case.label)
        layer.dispatcher = make_dispatcher(case.dispatcher, rt.layout.ep, layer.dispatcher.spec)
        layer.shared_mode = case.shared_expert
        x = synthetic_tokens(cfg, rt.rank // cfg.runtime.moe_tp, case.tokens_per_rank).to(rt.device)
        baseline = None
        if single_rank_baseline and rt.world_size > 1:
            baseline = SingleRankBaseline(rt, cfg.runtime.seed, case.tokens_per_rank)
        stats, _ = measure_layer(layer, x, cfg.runtime.warmup, reps, between=baseline.turn if baseline else None)
        record = {"case": case.__dict__ | {"label": case.label}, **stats, **_expert_stage(rt, layer, x, reps)}
        if rt.world_size == 1:
            record["peers"] = _hf_peers(cfg, layer, x, reps)
        if baseline is not None and rt.rank == 0:
            one = baseline.median_ms()
            record["single_rank_ms"] = one
            record["single_rank_cpu_ms"] = baseline.median_cpu_ms()
            record["ratio_to_single_rank"] = record["timing_ms"]["total"] / one
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
    from epruntime.cli.bench_report import format_bench, plot_bench, progress_bar

    rt = init_runtime(cfg)
    cases = [BenchCase(*c) for c in itertools.product(tokens, dispatchers, shared)]
    bar = progress_bar(len(cases), enabled=rt.rank == 0)
    records = health.run_or_exit(lambda: bench_cases(rt, cases, reps, bar, single_rank_baseline))
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
    if rt.rank == 0:
        print(format_bench(report), flush=True)
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        if plot_path:
            print(plot_bench(report, plot_path), flush=True)
    end_rank(rt)
    return 0
