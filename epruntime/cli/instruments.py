"""Per-stage wall-clock timing of the MoE pipeline (router, dispatch, experts, combine, shared)."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from epruntime.parallel import health

STAGES = ("router", "dispatch", "experts", "combine", "shared", "total")


def wall_and_cpu_ms(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall and host-CPU milliseconds (every thread of this process) of one ``fn()`` call, with the GPU's
    queued work included on CUDA."""
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


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {s: statistics.median(samples[s]) if samples[s] else 0.0 for s in STAGES}


class StageTimer:
    """Records one wall and one host-CPU duration per stage per forward (a stage entered twice in a
    forward is summed); synchronizes CUDA around each stage when on GPU. The CPU time is the whole
    process's (every thread: gloo's, the shared expert's), so on a machine whose cores the ranks share
    it says where the cores went, which wall time does not."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.cpu_samples: dict[str, list[float]] = defaultdict(list)
        self.pending: dict[str, float] = defaultdict(float)
        self.pending_cpu: dict[str, float] = defaultdict(float)
        self.enabled = True

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.pending[name] += (time.perf_counter() - start) * 1e3
        self.pending_cpu[name] += (time.process_time() - start_cpu) * 1e3

    @contextmanager
    def forward(self) -> Iterator[None]:
        """One forward pass, timed as stage ``total``; its stage sums become one sample each."""
        with self._timed("total"):
            yield
        for name, ms in self.pending.items():
            self.samples[name].append(ms)
            self.cpu_samples[name].append(self.pending_cpu[name])
        self.pending.clear()
        self.pending_cpu.clear()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage, and mark it for the watchdog and failure messages."""
        with self._timed(name), health.stage(name):
            yield

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (an untimed forward)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def reset(self) -> None:
        self.samples.clear()
        self.cpu_samples.clear()

    def medians_ms(self) -> dict[str, float]:
        """Median wall milliseconds of every stage (0.0 for a stage that never ran)."""
        return _medians(self.samples)

    def cpu_medians_ms(self) -> dict[str, float]:
        """Median host-CPU milliseconds of every stage, all of this process's threads (0.0 if it never ran)."""
        return _medians(self.cpu_samples)
