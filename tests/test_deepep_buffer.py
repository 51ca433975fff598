"""The DeepEP buffer's life cycle (:class:`epruntime.dispatch.deepep.SharedBuffer`), without a GPU.

A stand-in ``deep_ep`` module records what the runtime asks of ``deep_ep.Buffer``: one buffer sized
for every reservation, built with ``explicitly_destroy``, destroyed before it is rebuilt larger and
at ``end_rank``, and its low-latency area cleaned whenever low-latency follows normal mode.
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
import torch

from epruntime.dispatch import deepep
from epruntime.parallel.layout import EPView
from epruntime.parallel.topology import Topology


class RecordingBuffer:
    """Records construction, cleaning and destruction like ``deep_ep.Buffer`` would see them."""

    log: ClassVar[list[tuple]] = []

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank=24, **kw):
        self.num_nvl_bytes, self.num_rdma_bytes, self.low_latency_mode = num_nvl_bytes, num_rdma_bytes, low_latency_mode
        self.kwargs = kw
        self.log.append(("new", num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank))

    def clean_low_latency_buffer(self, *args: int) -> None:
        self.log.append(("clean", *args))

    def destroy(self) -> None:
        assert self.kwargs.get("explicitly_destroy"), "destroy() needs explicitly_destroy=True"
        self.log.append(("destroy", self.num_nvl_bytes, self.num_rdma_bytes))


@pytest.fixture
def fake_deep_ep(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    module = types.ModuleType("deep_ep")
    module.Buffer = RecordingBuffer
    monkeypatch.setitem(sys.modules, "deep_ep", module)
    RecordingBuffer.log = []
    return RecordingBuffer.log


def _ep(world: str) -> EPView:
    """An EP view whose groups are names: the stand-in buffer only records them."""
    return EPView(Topology(1, 2, 8), 0, world, f"{world}-intra", f"{world}-rail", torch.device("cpu"))


def test_one_buffer_for_all_reservations_rebuilt_only_when_too_small(fake_deep_ep: list[tuple]) -> None:
    ep = _ep("group")
    buf = deepep.shared_buffer(ep)
    assert deepep.shared_buffer(ep) is buf  # one per EP world, shared by its layers
    buf.reserve(nvl=100, rdma=0)
    buf.reserve(nvl=50, rdma=10)  # the largest of each size is kept
    first = buf.use("normal")
    assert buf.use("normal") is first
    assert first.kwargs == {"explicitly_destroy": True}
    buf.reserve(nvl=80)  # fits: kept
    assert buf.use("normal") is first
    buf.reserve(rdma=20, qps=24)  # too small: destroyed now, rebuilt on next use
    assert fake_deep_ep[-1] == ("destroy", 100, 10)
    second = buf.use("normal")
    assert second is not first
    assert fake_deep_ep == [("new", 100, 10, False, 1), ("destroy", 100, 10), ("new", 100, 20, False, 24)]


def test_low_latency_area_cleaned_after_normal_mode(fake_deep_ep: list[tuple]) -> None:
    buf = deepep.shared_buffer(_ep("group"))
    buf.reserve(nvl=8, rdma=8, low_latency=(128, 7168, 256))
    buf.use("low_latency")
    buf.use("normal")
    buf.use("low_latency")
    buf.use("low_latency")
    assert [e for e in fake_deep_ep if e[0] == "clean"] == [("clean", 128, 7168, 256)]


def test_releasing_the_ep_world_destroys_every_buffer_once(fake_deep_ep: list[tuple]) -> None:
    """What end_rank does after its barrier: each EP world's backends release what they keep there."""
    worlds = [_ep("world"), _ep("other")]
    for nvl, ep in enumerate(worlds, start=1):
        buf = deepep.shared_buffer(ep)
        buf.reserve(nvl=nvl)
        buf.use("normal")
    unused = _ep("unused")
    deepep.shared_buffer(unused).reserve(nvl=3)  # never used: nothing to destroy
    for ep in [*worlds, unused]:
        ep.release_resources()
        ep.release_resources()  # a second release finds nothing left
    assert sorted(e for e in fake_deep_ep if e[0] == "destroy") == [("destroy", 1, 0), ("destroy", 2, 0)]
    assert all(ep.resources == {} for ep in worlds)
