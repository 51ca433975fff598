"""``epruntime bench``: sweep tokens per rank, dispatchers and shared-expert modes, with peers timed
in the same run: transformers' DeepseekV3MoE (eager and grouped_mm experts) on one rank, and a
dense matmul of the expert stage's GEMM shapes as the machine's limit.

``--placements contiguous,eplb`` times two layers in turns on the same tokens: the contiguous one (``E`` slots,
slot ``p`` holds expert ``p``) and one placed by :func:`~epruntime.eplb.rebalance_experts` (``E + --redundant``
slots) from the load the contiguous layer recorded on the timed tokens (or, with ``--eplb-held-out``, on other
tokens of the same distribution); each gets its busiest-rank / mean load from the same timed forwards."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from epruntime.cli.eplb import SlotShape, place, predicted_balance
from epruntime.cli.instruments import StageTimer
from epruntime.cli.measure import (
    expert_balance,
    interleaved_medians,
    layer_stats,
    measure_layer,
    synthetic_tokens,
    verify_output,
)
from epruntime.cli.memtrack import peak_bytes
from epruntime.cli.single_rank import SingleRankBaseline
from epruntime.config.schema import Config
from epruntime.dispatch.registry import make_dispatcher
from epruntime.layer.moe import EPMoE
from epruntime.layer.probe import StageMarks
from epruntime.layer.synthetic import synthetic_state_dict
from epruntime.parallel import health
from epruntime.parallel.cpu_alloc import glibc_default_malloc
from epruntime.parallel.placement import ExpertPlacement
from epruntime.parallel.runtime import Runtime, end_rank, init_runtime

PEERS = ("eager", "grouped_mm")  # transformers' experts implementations
PLACEMENTS = ("contiguous", "eplb")
HELD_OUT = 16  # --eplb-held-out: calibration tokens per timed token


@dataclass(frozen=True)
class BenchCase:
    """One point of the sweep (``placement`` only with ``--placements``)."""

    tokens_per_rank: int
    dispatcher: str
    shared_expert: str
    micro_batches: int = 1
    placement: str | None = None

    @property
    def label(self) -> str:
        tail = (f"/mb{self.micro_batches}" if self.micro_batches > 1 else "") + (
            f"/{self.placement}" if self.placement else ""
        )
        return f"{self.dispatcher}/{self.shared_expert}/{self.tokens_per_rank}{tail}"


@dataclass(frozen=True)
class BenchOptions:
    """``--placements`` (of :data:`PLACEMENTS`), ``--redundant`` slots of the eplb one, ``--eplb-held-out``,
    ``--verify``, ``--micro-batches`` (swept like the tokens)."""

    placements: list[str] = field(default_factory=list)
    redundant: int = 0
    held_out: bool = False
    verify: bool = False
    micro_batches: tuple[int, ...] = (1,)


def placed_layer(rt: Runtime, row: list[int]) -> EPMoE:
    """The synthetic layer of ``runtime.seed`` on the slots of ``row`` (a ``phy2log`` row of any slot count),
    given to it directly rather than through the config (its dispatcher sizes the slots from the placement)."""
    ep = rt.layout.ep
    placement = ExpertPlacement.from_row(row, rt.cfg.model.n_routed_experts, ep.world_size, ep.topo.ranks_per_node)
    return EPMoE.random(rt.cfg.model, rt, rt.cfg.runtime.seed, placement)


def eplb_layer(
    rt: Runtime, contiguous: EPMoE, batches: list[torch.Tensor], redundant: int
) -> tuple[EPMoE, dict[str, Any]]:
    """A layer placed by EPLB from the load ``contiguous`` records on ``batches`` (each ``[T, H]``, one forward
    each: the routes of fixed tokens do not change), the load all-reduced over the EP world."""
    cfg = rt.cfg
    contiguous.load.reset()
    for x in batches:
        contiguous(x)
    _, load = expert_balance(contiguous)  # [E], the same on every rank
    shape = dataclasses.replace(SlotShape.of(cfg), slots=cfg.model.n_routed_experts + redundant)
    weight = torch.tensor([load], dtype=torch.float64)  # [1, E]
    row = place(weight, shape)  # [1, P]
    about = {
        "redundant_experts": redundant,
        "slots": shape.slots,
        "policy": shape.policy(),
        "placed_from_tokens_per_rank": sum(len(x) for x in batches),
        "predicted_max_over_mean": predicted_balance(weight, row, shape.ep_world)["max"],
    }
    return placed_layer(rt, row[0].tolist()), about


def calibration_batches(rt: Runtime, x: torch.Tensor, held_out: bool) -> tuple[list[torch.Tensor], str]:
    """The batches an eplb placement is made from: the timed tokens ``x [T, H]`` (the load they will see), or
    with ``held_out`` :data:`HELD_OUT` batches of ``T`` other tokens of the same distribution (a load estimated
    beforehand; batches of ``T`` fit every dispatcher's capacity)."""
    if not held_out:
        return [x], "the timed tokens"
    stream = rt.rank // rt.cfg.runtime.moe_tp + rt.world_size  # a token stream no rank times
    other = synthetic_tokens(rt.cfg, stream, HELD_OUT * len(x)).to(x.device)  # [16 T, H]
    return list(other.split(len(x))), "held-out tokens"


class Contender:
    """A second layer timed in turns with the bench's layer (``measure_layer(..., between=contender.turn)``) on
    the same tokens, with its own stage timer and counters; every rank calls it at the same points."""

    def __init__(self, layer: EPMoE, x: torch.Tensor, warmup: int) -> None:
        self.layer, self.x, self.timer, self.calls = layer, x, StageTimer(x.device), 0
        for _ in range(warmup):
            layer(x)
        layer.dispatcher.traffic.reset()
        layer.load.reset()

    def turn(self, calls: int) -> None:
        """One untimed and ``calls`` timed forwards."""
        probe, self.layer.probe = self.layer.probe, self.timer
        with self.timer.paused():
            self.layer(self.x)
        for _ in range(calls):
            self.y = self.layer(self.x)
        self.layer.probe = probe
        self.calls += calls + 1

    def stats(self) -> dict[str, Any]:
        """:func:`layer_stats` of the timed turns (collective)."""
        return layer_stats(self.layer, self.timer, self.x, self.calls)


def _turns(*fns: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """One ``between`` callable running each given contender's turn in order (None when there is none)."""
    given = [fn for fn in fns if fn is not None]
    if not given:
        return None

    def turn(calls: int) -> None:
        for fn in given:
            fn(calls)

    return turn


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference of two ranks' outputs over the max abs of ``b``, over every rank."""
    err = torch.tensor([(a.float() - b.float()).abs().max().item(), b.float().abs().max().item()], dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err[0] / err[1].clamp_min(1e-30))


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
    topk_idx, topk_weights = layer.router(x)  # [T, K] logical experts
    slots = layer.placement.choose(topk_idx, layer.ep_rank) if layer.remap else topk_idx  # [T, K] as the layer does
    received = layer.dispatcher.dispatch(x, slots, topk_weights)
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
    sd = synthetic_state_dict(cfg.model, cfg.runtime.seed, routing_skew=cfg.runtime.routing_skew)
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


def _peak_bytes(layer: EPMoE, x: torch.Tensor) -> int:
    """Peak bytes one forward allocates, on the fullest rank (one untimed forward, after the timed ones)."""
    peak = torch.tensor([peak_bytes(lambda: layer(x), x.device)], dtype=torch.int64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def _set_case(layer: EPMoE, case: BenchCase) -> None:
    """Give ``layer`` the case's dispatcher (on the layer's own EP view) and shared-expert mode."""
    layer.dispatcher = make_dispatcher(case.dispatcher, layer.dispatcher.ep, layer.dispatcher.spec)
    layer.shared_mode, layer.probe, layer.micro_batches = case.shared_expert, StageMarks(), case.micro_batches


def bench_cases(
    rt: Runtime,
    cases: list[BenchCase],
    reps: int,
    progress: Callable[[str], None],
    single_rank_baseline: bool = False,
    options: BenchOptions | None = None,
) -> list[dict]:
    """Measure every case (all ranks together); returns one record per case, or per case and placement with
    ``options.placements``. With ``single_rank_baseline`` (and more than one rank) each case's timed forwards
    alternate with rank 0 alone on the same work; an eplb layer takes its turns too."""
    cfg, options = rt.cfg, options or BenchOptions()
    e = cfg.model.n_routed_experts
    layer = placed_layer(rt, list(range(e))) if options.placements else EPMoE.random(cfg.model, rt, cfg.runtime.seed)
    records = []
    for case in cases:
        progress(case.label)
        x = synthetic_tokens(cfg, rt.rank // cfg.runtime.moe_tp, case.tokens_per_rank).to(rt.device)
        _set_case(layer, case)
        contender, about = None, {}
        if "eplb" in options.placements:  # placed from this case's load, on its dispatcher
            batches, source = calibration_batches(rt, x, options.held_out)
            contender, about = eplb_layer(rt, layer, batches, options.redundant)
            about["placed_from"] = source
            _set_case(contender, case)
        baseline = None
        if single_rank_baseline and rt.world_size > 1:
            baseline = SingleRankBaseline(rt, cfg.runtime.seed, case.tokens_per_rank)
        rival = Contender(contender, x, cfg.runtime.warmup) if contender is not None else None
        between = _turns(baseline.turn if baseline else None, rival.turn if rival else None)
        stats, y = measure_layer(layer, x, cfg.runtime.warmup, reps, between=between)
        measured = {"contiguous": (layer, stats, y)} if options.placements else {None: (layer, stats, y)}
        if rival is not None:
            measured["eplb"] = (contender, rival.stats(), rival.y)
        for placement, (one, one_stats, out) in measured.items():
            named = dataclasses.replace(case, placement=placement)
            one_stats.pop("expert_load")
            record = {"case": named.__dict__ | {"label": named.label}, **one_stats, **_expert_stage(rt, one, x, reps)}
            if placement == "eplb":
                contiguous_ms = stats["timing_ms"]["total"]
                record |= {"eplb": about, "ratio_to_contiguous": one_stats["timing_ms"]["total"] / contiguous_ms}
                record["max_rel_diff_to_contiguous"] = _rel_diff(out, y)
            if options.verify:
                record["verify"] = verify_output(rt, cfg.runtime.seed, x, out)
            if rt.world_size == 1 and placement != "eplb":
                record["peers"] = _hf_peers(cfg, one, x, reps)
            if baseline is not None and rt.rank == 0:
                record["single_rank_ms"] = baseline.median_ms()
                record["single_rank_cpu_ms"] = baseline.median_cpu_ms()
                record["ratio_to_single_rank"] = record["timing_ms"]["total"] / record["single_rank_ms"]
            record["peak_bytes"] = _peak_bytes(one, x)
            if placement in options.placements or placement is None:
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
    options: BenchOptions | None = None,
) -> int:
    """Entry point of ``epruntime bench`` in each rank; rank 0 prints, writes JSON and the plot."""
    from epruntime.cli.bench_report import format_bench, plot_bench, progress_bar

    rt = init_runtime(cfg)
    chunks = (options or BenchOptions()).micro_batches
    cases = [BenchCase(*c) for c in itertools.product(tokens, dispatchers, shared, chunks)]
    bar = progress_bar(len(cases), enabled=rt.rank == 0)
    records = health.run_or_exit(lambda: bench_cases(rt, cases, reps, bar, single_rank_baseline, options))
    bar.close()
    report: dict[str, Any] = {
        "world_size": rt.world_size,
        "nnodes": rt.topo.nnodes,
        "ranks_per_node": rt.topo.ranks_per_node,
        "dtype": cfg.model.dtype,
        "reps": reps,
        "threads_per_rank": torch.get_num_threads(),
        "routing_skew": cfg.runtime.routing_skew,
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
