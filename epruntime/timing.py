"""Per-stage wall-clock timing of the MoE pipeline (router, dispatch, experts, combine, shared)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import health

STAGES = ("router", "dispatch", "experts", "combine", "shared", "total")


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of one ``fn()`` call, with the GPU's queued work included on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


class StageTimer:
    """Records one duration per stage per forward (a stage entered twice in a forward is summed);
    synchronizes CUDA around each stage when on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.pending: dict[str, float] = defaultdict(float)
        self.enabled = True

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.pending[name] += (time.perf_counter() - start) * 1e3

    @contextmanager
    def forward(self) -> Iterator[None]:
        """One forward pass, timed as stage ``total``; its stage sums become one sample each."""
        with self._timed("total"):
            yield
        for name, ms in self.pending.items():
            self.samples[name].append(ms)
        self.pending.clear()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage, and mark it for the watchdog and failure messages."""
        with self._timed(name), health.stage(name):
            yield

    def reset(self) -> None:
        self.samples.clear()

    def medians_ms(self) -> dict[str, float]:
        """Median milliseconds of every stage (0.0 for a stage that never ran)."""
        return {s: statistics.median(self.samples[s]) if self.samples[s] else 0.0 for s in STAGES}
