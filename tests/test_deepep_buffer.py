"""The DeepEP buffer's life cycle (:class:`epruntime.dispatch.deepep.SharedBuffer`), without a GPU.

A stand-in ``deep_ep`` module (:mod:`tests.standins`) records what the runtime asks of ``deep_ep.Buffer``:
one buffer sized for every reservation, built with ``explicitly_destroy`` after one barrier over the group,
destroyed before it is rebuilt larger and at ``end_rank``, and its low-latency area cleaned whenever
low-latency follows normal mode.
"""

from __future__ import annotations

import sys

import pytest
import torch

from epruntime.dispatch import deepep
from epruntime.parallel.layout import EPView
from epruntime.parallel.topology import Topology
from tests.standins import Recorder, make_deep_ep


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The stand-in ``deep_ep`` (rank 0 of 2) and ``torch.distributed.barrier``, recording into one log."""
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "deep_ep", make_deep_ep(recorder, world=2, rank=0))
    monkeypatch.setattr(deepep.dist, "barrier", lambda group=None, **kw: recorder.add("barrier", group))
    return recorder


def _ep(world: str) -> EPView:
    """An EP view whose groups are names: the stand-in buffer only records them."""
    return EPView(Topology(1, 2, 8), 0, world, f"{world}-intra", f"{world}-rail", torch.device("cpu"))


def test_one_buffer_for_all_reservations_rebuilt_only_when_too_small(rec: Recorder) -> None:
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
    assert rec.log[-1] == ("destroy", 100, 10)
    second = buf.use("normal")
    assert second is not first
    assert rec.log == [  # every build waits for the whole group first
        ("barrier", "group"),
        ("new", 100, 10, False, 1),
        ("destroy", 100, 10),
        ("barrier", "group"),
        ("new", 100, 20, False, 24),
    ]


def test_low_latency_area_cleaned_after_normal_mode(rec: Recorder) -> None:
    buf = deepep.shared_buffer(_ep("group"))
    buf.reserve(nvl=8, rdma=8, low_latency=(128, 7168, 256))
    buf.use("low_latency")
    assert not buf.dirty  # a new buffer starts zeroed
    buf.use("normal")
    assert buf.dirty
    buf.use("low_latency")
    buf.use("low_latency")
    assert rec.calls("clean") == [("clean", 128, 7168, 256)] and not buf.dirty
    buf.clean_if_dirty()  # clean already: nothing to do
    assert len(rec.calls("clean")) == 1


def test_releasing_the_ep_world_destroys_every_buffer_once(rec: Recorder) -> None:
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
    assert sorted(rec.calls("destroy")) == [("destroy", 1, 0), ("destroy", 2, 0)]
    assert all(ep.resources == {} for ep in worlds)
