"""What :class:`epruntime.layer.cuda_graph.GraphedMoE` does around a replay, which runs no Python, without a GPU.

torch.cuda's streams and graphs are recording stand-ins (:mod:`tests.standins`; a replay is only logged),
and the layer is a stand-in that runs its dispatcher's dispatch and combine. Checked: DeepEP's low-latency
area is cleaned before a replay when a normal-mode call used the shared buffer since (never inside the
capture); the on-device traffic counters are updated inside the captured region, so each replay adds; and
the host-side counts of ``lowlatency`` move from the capture (which sent nothing) to every replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from epruntime.dispatch import deepep, lowlatency
from epruntime.dispatch.base import DispatchSpec
from epruntime.layer import cuda_graph
from epruntime.parallel.layout import EPView
from epruntime.parallel.topology import Topology
from tests.standins import Recorder, install_recording_deep_ep

H = 256
SPEC = DispatchSpec(hidden_size=H, dtype=torch.bfloat16, num_experts=8, capacity=4)


class StubLayer:
    """What GraphedMoE needs of an EPMoE: dispatcher, experts, device, cfg, ``uninstrumented`` and a forward
    that dispatches (fixed routing), returns the received rows as the expert outputs and combines."""

    def __init__(self, dispatcher) -> None:
        self.dispatcher = dispatcher
        self.experts = SimpleNamespace(graph_safe=True)
        self.device = torch.device("cpu")
        self.cfg = SimpleNamespace(hidden_size=H, torch_dtype=torch.bfloat16)

    @contextmanager
    def uninstrumented(self) -> Iterator[None]:
        yield

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([[0, 5], [4, 6], [1, 7], [7, 3]])[: x.shape[0]]
        received = self.dispatcher.dispatch(x, idx, torch.full(idx.shape, 0.5))
        return self.dispatcher.combine(received.recv_x, received.handle)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = install_recording_deep_ep(monkeypatch)
    monkeypatch.setattr(cuda_graph, "check_capturable", lambda layer, num_tokens, warmup: None)  # CPU tensors
    return recorder


def _ep() -> EPView:
    return EPView(Topology(1, 2, 8), 0, "world", "intra", "rail", torch.device("cpu"))


def _x() -> torch.Tensor:
    return torch.randn(4, H, generator=torch.Generator().manual_seed(0)).bfloat16()


def test_replay_cleans_the_low_latency_area_after_a_normal_mode_call(rec: Recorder) -> None:
    ep = _ep()
    normal = deepep.DeepEPDispatcher(ep, SPEC)  # e.g. an auto or deepep prefill layer on the same EP world
    graphed = cuda_graph.GraphedMoE(StubLayer(deepep.DeepEPLowLatencyDispatcher(ep, SPEC)), num_tokens=4)
    begin, end = rec.names().index("capture_begin"), rec.names().index("capture_end")
    assert "clean" not in rec.names()[begin:end]  # nothing host-decided inside the graph
    rec.log.clear()
    graphed(_x())
    assert rec.names() == ["replay"]  # clean since the last low-latency call: nothing to do
    StubLayer(normal)(_x())  # a normal-mode forward dirties the shared buffer
    rec.log.clear()
    graphed(_x())
    graphed(_x())
    assert rec.names() == ["clean", "replay", "replay"]
    assert rec.log[0] == ("clean", SPEC.capacity, H, SPEC.num_experts)


def test_device_counters_are_updated_inside_the_captured_region(rec: Recorder, monkeypatch) -> None:
    dispatcher = deepep.DeepEPLowLatencyDispatcher(_ep(), SPEC)
    add = dispatcher.traffic.add_on_device
    monkeypatch.setattr(
        dispatcher.traffic, "add_on_device", lambda phase, b: (rec.add("count", phase, rec.capturing), add(phase, b))
    )
    graphed = cuda_graph.GraphedMoE(StubLayer(dispatcher), num_tokens=4, warmup=1)
    captured = rec.log[rec.names().index("capture_begin") : rec.names().index("capture_end")]
    assert [e for e in captured if e[0] == "count"] == [("count", "dispatch", True), ("count", "combine", True)]
    assert graphed.replay_bytes == {}  # everything this backend counts is on the device, replayed by the graph


def _lowlatency_on_two_ranks(monkeypatch: pytest.MonkeyPatch) -> lowlatency.LowLatencyDispatcher:
    """``lowlatency`` as rank 0 of 2, its all-to-all a local copy (the stand-in's peer sends back the block)."""

    def exchange(out: torch.Tensor, block: torch.Tensor, group=None, async_op: bool = False):
        out.copy_(block)
        return SimpleNamespace(wait=lambda: None)

    monkeypatch.setattr(lowlatency.dist, "all_to_all_single", exchange)
    return lowlatency.LowLatencyDispatcher(_ep(), SPEC)


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def test_host_counted_traffic_is_added_on_every_replay(rec: Recorder, monkeypatch) -> None:
    dispatcher = _lowlatency_on_two_ranks(monkeypatch)
    StubLayer(dispatcher)(_x())
    per_call = _nonzero(dispatcher.traffic.bytes)
    assert per_call["dispatch.intra_node"] == SPEC.capacity * H * 2  # one fixed block of M rows to rank 1
    dispatcher.traffic.reset()
    graphed = cuda_graph.GraphedMoE(StubLayer(dispatcher), num_tokens=4, warmup=2)
    assert graphed.replay_bytes == per_call
    assert _nonzero(dispatcher.traffic.bytes) == {k: 2 * v for k, v in per_call.items()}  # warm-ups, not capture
    for _ in range(3):
        graphed(_x())
    assert _nonzero(dispatcher.traffic.bytes) == {k: 5 * v for k, v in per_call.items()}


def test_graphed_layer_refuses_an_eager_only_expert_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = StubLayer(_lowlatency_on_two_ranks(monkeypatch))  # the real guard: no stand-ins installed
    layer.experts = SimpleNamespace(graph_safe=False, loop_reason="torch 2.8.0 runs torch._grouped_mm on SM90 only")
    with pytest.raises(ValueError, match=r"per-expert loop \(torch 2\.8\.0 runs torch\._grouped_mm on SM90 only\)"):
        cuda_graph.GraphedMoE(layer, num_tokens=4)
