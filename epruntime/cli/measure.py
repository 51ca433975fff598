"""Measuring helpers shared by the commands: synthetic tokens, timed calls, the timed layer loop and
verification against the single-process reference."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from epruntime.cli.instruments import StageTimer
from epruntime.config.schema import Config
from epruntime.dispatch.base import traffic_report
from epruntime.layer.moe import EPMoE
from epruntime.layer.probe import STAGES
from epruntime.layer.reference import reference_moe
from epruntime.layer.synthetic import synthetic_state_dict
from epruntime.parallel import health
from epruntime.parallel.runtime import Runtime


def wall_and_cpu_ms(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall and host-CPU milliseconds (every thread of this process) of one ``fn()`` call, with the GPU's
    queued work included on CUDA (a synchronize on each side: this times a whole call, from outside)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of one ``fn()`` call, with the GPU's queued work included on CUDA."""
    return wall_and_cpu_ms(fn, device)[0]


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
            samples[name] += [time_ms(fn, device) for _ in range(min(block, reps - len(samples[name])))]
    return {name: statistics.median(times) for name, times in samples.items()}


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
    m = rt.cfg.model
    sd = synthetic_state_dict(m, layer_seed, routing_skew=rt.cfg.runtime.routing_skew)
    ref = reference_moe(x.cpu(), sd, m, m.n_routed_experts // rt.topo.nnodes)  # [T, H] fp32, on the host
    err = (y.float().cpu() - ref).abs().max().item() if len(ref) else 0.0
    scale = ref.abs().max().item() if len(ref) else 0.0
    err, scale = _reduce([err, scale], dist.ReduceOp.MAX)
    rel = err / max(scale, 1e-30)
    tol = TOLERANCE[rt.cfg.model.dtype]
    return {"max_abs_err": err, "max_rel_err": rel, "tolerance": tol, "ok": rel <= tol}


def expert_balance(layer: EPMoE) -> tuple[dict[str, Any], list[int]]:
    """The layer's load counters since its last reset, from every rank (one all-gather; collective): the
    (token, expert) pairs each rank's expert stage received per call, the busiest rank over the mean, and the
    pairs per logical expert ``[E]`` summed over the EP world (each token once: the ranks of one expert-TP group
    share their tokens, so only TP index 0 counts)."""
    load = layer.load
    mine = torch.cat([load.routed, load.received.reshape(1)])  # [E + 1] int64, on the device
    every = torch.zeros(dist.get_world_size() * len(mine), dtype=torch.int64, device=mine.device)  # [W * (E + 1)]
    health.all_gather_flat(every, mine)
    every = every.cpu().view(-1, len(mine))  # [W, E + 1]
    routed = every[:: layer.tp.size, :-1].sum(dim=0)  # [E]: TP groups are consecutive ranks, index 0 first
    received = every[:, -1].double() / max(load.calls, 1)  # [W] pairs per layer call
    mean = float(received.mean())
    busiest = float(received.max()) / mean if mean > 0 else 1.0
    return {"recv_pairs_per_rank": received.tolist(), "max_over_mean": busiest}, routed.tolist()


def layer_stats(layer: EPMoE, timer: StageTimer, x: torch.Tensor, calls: int) -> dict[str, Any]:
    """The figures of one timed loop of ``calls`` forwards (collective: every rank, after the loop): stage
    medians of the slowest rank, host CPU per stage summed over ranks, traffic per layer, tokens/s, expert load."""
    tp = layer.tp.size  # the ranks of one expert-TP group share their tokens
    medians = timer.medians_ms()
    slowest = dict(zip(STAGES, _reduce([medians[s] for s in STAGES], dist.ReduceOp.MAX), strict=True))
    cpu = timer.cpu_medians_ms()
    cpu_all_ranks = dict(zip(STAGES, _reduce([cpu[s] for s in STAGES], dist.ReduceOp.SUM), strict=True))
    traffic = layer.dispatcher.traffic.as_tensor()
    dist.all_reduce(traffic)
    total_tokens = int(_reduce([float(x.shape[0])], dist.ReduceOp.SUM)[0]) // tp
    report = traffic_report(torch.div(traffic, calls, rounding_mode="floor"))
    balance, load = expert_balance(layer)
    return {
        "dispatcher": layer.dispatcher.name,
        "shared_expert": layer.shared_mode,
        "total_tokens": total_tokens,
        "timing_ms": slowest,
        "cpu_ms_all_ranks": cpu_all_ranks,
        "throughput_tokens_per_s": total_tokens / (slowest["total"] / 1e3) if slowest["total"] else 0.0,
        "traffic_bytes": report,
        "traffic_bytes_per_token": {link: report[link] / max(total_tokens, 1) for link in ("intra_node", "inter_node")},
        "expert_balance": balance,
        "expert_load": load,  # [E] pairs per logical expert over the counted calls (callers write or drop it)
    }


def measure_layer(
    layer: EPMoE,
    x: torch.Tensor,
    warmup: int,
    iters: int,
    between: Callable[[int], None] | None = None,
    block: int = 3,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm up, time ``iters`` forwards and return :func:`layer_stats` and this rank's last output.

    Every rank must call it; every rank gets the same figures. The traffic and expert-load counters start
    after the warm-up. ``between(n)``, when given, runs before each block of ``block`` timed forwards (a
    contender timed in turns with this layer, ``n`` calls per turn), and is followed by one untimed forward:
    each side of a turn starts with one call that finds the caches the other side left.
    """
    timer = StageTimer(x.device)
    for _ in range(warmup):
        layer(x)
    layer.dispatcher.traffic.reset()
    layer.load.reset()
    probe, layer.probe = layer.probe, timer
    calls = iters
    for i in range(iters):
        if between is not None and i % block == 0:
            between(min(block, iters - i))
            with timer.paused():
                layer(x)
            calls += 1
        y = layer(x)
    layer.probe = probe
    return layer_stats(layer, timer, x, calls), y
