"""The stage timer ``run`` and ``bench`` install on a layer: ``layer.probe = StageTimer(device)``.

Wall time per stage comes from CUDA events recorded on the stream each stage runs on (the shared
expert's on its side stream), read once by :meth:`StageTimer.collect` after the timed loop: nothing
synchronizes inside a forward. On CPU it is ``perf_counter``. Host CPU time (``process_time``: every
thread of the process, gloo's included) is taken on both: on a machine whose cores the ranks share it
says where the cores went, which wall time does not.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from epruntime.layer.probe import STAGES, StageMarks


class StageTimer(StageMarks):
    """Records one wall and one host-CPU duration per stage per forward (a stage entered twice in a forward
    is summed), and marks the stages as :class:`~epruntime.layer.probe.StageMarks` does."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = True
        self._spans: list[tuple[str, Any, Any]] = []  # (stage, start, end) of the forward in progress
        self._cpu: dict[str, float] = defaultdict(float)  # host-CPU ms per stage of the forward in progress
        self._forwards: list[tuple[list[tuple[str, Any, Any]], dict[str, float]]] = []  # waiting for collect
        self.samples: dict[str, list[float]] = defaultdict(list)  # wall ms per forward, once collected
        self.cpu_samples: dict[str, list[float]] = defaultdict(list)

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: the one the stage's work is queued on
        return event

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start, start_cpu = self._mark(), time.process_time()
        yield
        self._spans.append((name, start, self._mark()))
        self._cpu[name] += (time.process_time() - start_cpu) * 1e3

    @contextmanager
    def layer(self, label: str) -> Iterator[None]:
        """One forward, timed as stage ``total``; its stages become one sample each."""
        with super().layer(label), self._timed("total"):
            yield
        if self.enabled:
            self._forwards.append((self._spans, dict(self._cpu)))
            self._spans, self._cpu = [], defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with super().stage(name), self._timed(name):
            yield

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (an untimed forward)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def collect(self) -> None:
        """Turn the recorded forwards into samples: on CUDA one synchronize, then the events are read."""
        if self.cuda and self._forwards:
            torch.cuda.synchronize()
        for spans, cpu in self._forwards:
            wall: dict[str, float] = defaultdict(float)
            for name, start, end in spans:
                wall[name] += start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            for name, ms in wall.items():
                self.samples[name].append(ms)
                self.cpu_samples[name].append(cpu[name])
        self._forwards.clear()

    def reset(self) -> None:
        """Forget every sample (and what is waiting for :meth:`collect`)."""
        self._forwards.clear()
        self.samples.clear()
        self.cpu_samples.clear()

    def medians_ms(self) -> dict[str, float]:
        """Median wall milliseconds of every stage (0.0 for a stage that never ran)."""
        self.collect()
        return {s: statistics.median(self.samples[s]) if self.samples[s] else 0.0 for s in STAGES}

    def cpu_medians_ms(self) -> dict[str, float]:
        """Median host-CPU milliseconds of every stage, all of this process's threads (0.0 if it never ran)."""
        self.collect()
        return {s: statistics.median(self.cpu_samples[s]) if self.cpu_samples[s] else 0.0 for s in STAGES}
