"""Compare the shared-expert modes (overlap, defer, serial) on one layer: time and peak memory,
each as a ratio to ``serial`` measured in the same run."""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.distributed as dist

from epruntime.cli.measure import time_ms
from epruntime.cli.memtrack import peak_bytes
from epruntime.config.schema import SHARED_EXPERT_MODES
from epruntime.layer.moe import EPMoE


def _time_ms(layer: EPMoE, x: torch.Tensor) -> float:
    dist.barrier()  # every rank starts the layer together, as in a model
    return time_ms(lambda: layer(x), x.device)


def compare_shared_modes(layer: EPMoE, x: torch.Tensor, iters: int) -> dict[str, Any]:
    """Per mode: median layer ms and peak bytes (max over ranks), and both as ratios to serial.

    Modes are interleaved round by round so that drift on a shared machine hits each alike.
    """
    original = layer.shared_mode
    samples: dict[str, list[float]] = {m: [] for m in SHARED_EXPERT_MODES}
    peaks: dict[str, int] = {}
    try:
        for mode in SHARED_EXPERT_MODES:
            layer.shared_mode = mode
            layer(x)  # warm-up
            peaks[mode] = peak_bytes(lambda: layer(x), x.device)
        for _ in range(iters):
            for mode in SHARED_EXPERT_MODES:
                layer.shared_mode = mode
                samples[mode].append(_time_ms(layer, x))
    finally:
        layer.shared_mode = original
    values = torch.tensor([[statistics.median(samples[m]), float(peaks[m])] for m in SHARED_EXPERT_MODES])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)  # the slowest rank and the fullest rank
    serial_ms, serial_peak = values[SHARED_EXPERT_MODES.index("serial")].tolist()
    report = {}
    for mode, (ms, peak) in zip(SHARED_EXPERT_MODES, values.tolist(), strict=True):
        report[mode] = {
            "time_ms": ms,
            "peak_bytes": int(peak),
            "time_ratio_to_serial": ms / serial_ms if serial_ms else 0.0,
            "peak_ratio_to_serial": peak / serial_peak if serial_peak else 0.0,
        }
    return report


def format_shared_modes(report: dict[str, Any]) -> str:
    """The comparison as printed in the run summary."""
    lines = ["shared expert  median ms  x serial  peak MB  x serial"]
    for mode, r in report.items():
        lines.append(
            f"  {mode:<12}{r['time_ms']:9.3f}{r['time_ratio_to_serial']:9.2f}"
            f"{r['peak_bytes'] / 1e6:9.2f}{r['peak_ratio_to_serial']:9.2f}"
        )
    return "\n".join(lines)
