"""The plain layer makes no host-device synchronization of its own; instrumentation is opt-in and reads
the device once, after the timed loop.

A stand-in counts what would synchronize on a GPU: host reads of tensor values (``item``/``int``,
``tolist``, ``cpu``, and the operators whose output size depends on values: ``nonzero``, boolean
indexing, ``bincount``, ``unique``, ``repeat_interleave``), and every ``torch.cuda`` synchronize. Each
read is attributed to the region it happens in: the dispatcher's calls, the expert stage, or the
layer's own code (router, shared expert, joins).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from epruntime import EPMoE
from epruntime.cli.instruments import StageTimer
from epruntime.dispatch.registry import backend
from epruntime.layer.probe import PLAIN
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import make_config, tokens

VALUE_SIZED = {  # operators whose output size (or value on the host) depends on tensor values
    "aten.nonzero.default",
    "aten.bincount.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.repeat_interleave.Tensor",
    "aten.masked_select.default",
    "aten._local_scalar_dense.default",
}


class SyncCounter(TorchDispatchMode):
    """Counts host reads per region (see the module docstring); ``region`` is set by the wrappers."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.region = "layer"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        )
        if name in VALUE_SIZED or bool_index:
            self.reads[self.region] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def inside(self, region: str) -> Iterator[None]:
        outer, self.region = self.region, region
        try:
            yield
        finally:
            self.region = outer

    def wrap(self, region: str, fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.inside(region):
                return fn(*args, **kwargs)

        return wrapped


def _count(rt: Runtime, dispatcher_name: str) -> dict[str, int]:
    """Host reads per region of one forward of the plain layer (after a warm-up), plus device syncs."""
    cfg = rt.cfg
    layer = EPMoE.random(cfg.model, rt, seed=1)
    x = tokens(8, cfg.model.hidden_size, 40 + rt.rank)
    layer(x)
    counter = SyncCounter()
    syncs = Counter()
    originals = {}

    def counted(name: str, fn: Callable) -> Callable:
        def wrapped(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.reads[counter.region] += 1
            return fn(self, *args, **kwargs)

        return wrapped

    for method in ("tolist", "cpu"):
        originals[method] = getattr(torch.Tensor, method)
        setattr(torch.Tensor, method, counted(method, originals[method]))
    sync_originals = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: syncs.update(["cuda.synchronize"])
    d = layer.dispatcher
    for method in ("dispatch_a", "dispatch_b", "combine_a", "combine_b"):
        setattr(d, method, counter.wrap("dispatcher", getattr(d, method)))
    layer.experts.run = counter.wrap("experts", layer.experts.run)
    try:
        with counter:
            layer(x)
    finally:
        for method, fn in originals.items():
            setattr(torch.Tensor, method, fn)
        torch.cuda.synchronize = sync_originals
    assert layer.probe is PLAIN
    return {**counter.reads, "device_syncs": sum(syncs.values())}


@pytest.mark.parametrize("name", ["flat", "hierarchical", "lowlatency", "auto"])
def test_plain_layer_reads_the_device_only_where_the_dispatch_layout_needs(name: str) -> None:
    cfg = make_config(2, 2, runtime={"dispatcher": name, "max_tokens_per_rank": 8, "tokens_per_rank": 8})
    for counts in run_world(_count, cfg, name):
        assert counts.get("layer", 0) == 0, counts  # router, shared expert, joins: nothing of their own
        assert counts["device_syncs"] == 0, counts
        if backend(name).graph_safe:  # the fixed-capacity dispatch itself never reads the device
            assert counts.get("dispatcher", 0) == 0, counts
        # the expert stage reads one size: the normal layout's pair count, or the masked layout's valid rows
        assert counts.get("experts", 0) <= 1, counts


def test_one_rank_world_forward_reads_only_the_expert_stage_size() -> None:
    [counts] = run_world(_count, make_config(1, 1), "flat")
    assert counts.get("layer", 0) == 0 and counts.get("dispatcher", 0) == 0 and counts["device_syncs"] == 0
    assert counts.get("experts", 0) == 1


class FakeEvent:
    """Stands in for torch.cuda.Event: records happen in order on a fake clock; nothing synchronizes."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self, stream: Any = None) -> None:
        FakeEvent.clock += 1.0
        self.at = FakeEvent.clock

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None, "read before both events were recorded"
        return end.at - self.at


def test_cuda_stage_timer_records_events_and_synchronizes_once_after_the_loop(monkeypatch) -> None:
    syncs: list[str] = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append("sync"))
    timer = StageTimer(torch.device("cuda"))
    for _ in range(5):
        with timer.layer("layer 0"):
            with timer.stage("router"):
                pass
            for _ in range(2):  # entered twice in one forward: summed
                with timer.stage("dispatch"):
                    pass
    assert syncs == []  # nothing inside the forwards
    wall = timer.medians_ms()
    assert syncs == ["sync"]  # one, when the samples are read
    assert wall["router"] == 1.0 and wall["dispatch"] == 2.0 and wall["total"] == 7.0 and wall["experts"] == 0.0
    assert len(timer.samples["total"]) == 5
    timer.medians_ms()
    assert syncs == ["sync"]  # nothing left to read: no second synchronize
