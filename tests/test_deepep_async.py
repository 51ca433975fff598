"""The DeepEP dispatchers against the recording stand-in (:mod:`tests.standins`), without a GPU: what is
called on ``deep_ep.Buffer``, in what order, with which arguments and on which stream.

- normal mode: dispatch_a captures an event on the current stream and issues layout and dispatch after
  it on DeepEP's stream (``async_finish``, ``allocate_on_comm_stream``); only dispatch_b makes the current
  stream wait, so the shared expert launched in between overlaps; combine likewise; the configs and the
  buffer follow ``num_sms``; the first call of a buffer waits for the whole group once;
- low-latency mode: bf16 or FP8 (``use_fp8``), the message sizes DeepEP sends, and the FP8 pair handed
  to DeepGEMM's masked kernel as it arrived.
"""

from __future__ import annotations

import sys

import pytest
import torch

from epruntime.dispatch import deepep
from epruntime.dispatch.base import DispatchResult, DispatchSpec, MaskedDispatchResult
from epruntime.io.fp8 import quantize_block_fp8
from epruntime.layer.experts import LocalExperts
from epruntime.parallel.layout import EPView
from epruntime.parallel.topology import Topology
from tests.factories import make_config
from tests.standins import (
    FakeStream,
    Recorder,
    install_recording_deep_ep,
    make_deep_gemm,
)

H, K = 256, 2
SPEC = DispatchSpec(hidden_size=H, dtype=torch.bfloat16, num_experts=8, capacity=4)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """deep_ep for rank 0 of 2 (one node), the group barrier and torch.cuda's streams, all recording."""
    return install_recording_deep_ep(monkeypatch)


def _ep(name: str = "world") -> EPView:
    return EPView(Topology(1, 2, 8), 0, name, f"{name}-intra", f"{name}-rail", torch.device("cpu"))


def _routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(0)).bfloat16()
    idx = torch.tensor([[0, 5], [4, 6], [1, -1], [7, 3]])  # rank 0 owns experts 0-3, rank 1 owns 4-7
    return x, idx, torch.rand(4, K)


def test_normal_mode_is_issued_on_deepeps_stream_and_waited_for_in_dispatch_b(rec: Recorder) -> None:
    dispatcher = deepep.DeepEPDispatcher(_ep(), SPEC, num_sms=24)
    x, idx, weights = _routing()
    rec.log.clear()
    inflight = dispatcher.dispatch_a(x, idx, weights)
    with torch.cuda.stream(FakeStream(rec, "side")):
        rec.add("shared expert", rec.stream)  # what EPMoE launches between dispatch_a and dispatch_b
    result = dispatcher.dispatch_b(inflight)
    combined = dispatcher.combine_b(dispatcher.combine_a(torch.ones(result.recv_x.shape, dtype=x.dtype), result.handle))
    assert rec.log == [
        ("barrier", "world"),  # the buffer's first call waits for every rank (their warm-ups) once
        ("new", dispatcher.buffers.num_nvl_bytes, 0, False, deepep.NORMAL_QPS),
        ("capture", "main"),  # an event after the router's work on the current stream
        ("get_dispatch_layout", "captured on main", True, True, "main"),
        ("dispatch", "laid out", True, True, 24, 1, "main"),
        ("shared expert", "side"),  # overlaps: nothing has waited for the dispatch yet
        ("wait", "dispatched", "main"),  # dispatch_b: the current stream waits for DeepEP's
        ("capture", "main"),
        ("combine", "captured on main", True, True, 24, "main"),
        ("wait", "combined", "main"),
    ]
    assert isinstance(result, DispatchResult) and result.recv_topk_idx.dtype == torch.int64
    assert result.tokens_per_expert.tolist() == [1, 1, 0, 1]  # local experts 0-3 of rank 0
    assert combined.shape == x.shape and torch.equal(combined[2], torch.ones(H, dtype=x.dtype))
    # counted on the device, no host read: rows 0, 1, 3 go to rank 1 (same node), each way
    intra, meta = 3 * H * 2, 3 * K * (8 + 4)
    assert dispatcher.traffic.as_tensor().tolist() == [intra, 0, meta, intra, 0, 0]


def test_num_sms_sizes_the_buffer_and_every_call(rec: Recorder) -> None:
    default = deepep.DeepEPDispatcher(_ep("a"), SPEC)
    wide = deepep.DeepEPDispatcher(_ep("b"), SPEC, num_sms=32)
    assert rec.calls("set_num_sms") == [("set_num_sms", deepep.DEFAULT_NUM_SMS), ("set_num_sms", 32)]
    assert wide.dispatch_config.num_sms == wide.combine_config.num_sms == 32
    assert default.dispatch_config.num_sms == 20  # kept: a later set_num_sms does not resize a built dispatcher
    # DeepEP's NVL hint is linear in the channels (num_sms / 2): 16 channels against 10
    assert wide.buffers.num_nvl_bytes * 10 == default.buffers.num_nvl_bytes * 16
    with pytest.raises(ValueError, match="positive even number"):
        deepep.DeepEPDispatcher(_ep("c"), SPEC, num_sms=21)


def test_barrier_once_per_buffer_before_its_first_call(rec: Recorder) -> None:
    ep = _ep()
    dispatcher = deepep.DeepEPDispatcher(ep, SPEC)
    low = deepep.DeepEPLowLatencyDispatcher(ep, SPEC)  # the same EP world (as auto builds them): one buffer
    x, idx, weights = _routing()
    for _ in range(2):
        dispatcher.dispatch(x, idx, weights)
        low.dispatch(x, idx, weights)
    assert rec.names().count("barrier") == 1 and rec.names().index("barrier") < rec.names().index("new")
    assert rec.calls("clean") == [("clean", 4, H, 8)] * 2  # each low-latency call after a normal one


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_messages_and_fp8_dispatch(rec: Recorder, use_fp8: bool) -> None:
    dispatcher = deepep.DeepEPLowLatencyDispatcher(_ep(), SPEC, use_fp8=use_fp8)
    x, idx, weights = _routing()
    result = dispatcher.dispatch(x, idx, weights)
    assert rec.calls("low_latency_dispatch") == [("low_latency_dispatch", use_fp8, True, "main", False)]
    assert isinstance(result, MaskedDispatchResult) and result.masked_m.tolist() == [1, 1, 0, 1]
    if use_fp8:
        q, scale = result.recv_x
        assert q.dtype == torch.float8_e4m3fn and q.shape == (4, 8, H) and scale.shape == (4, 8, H // 128)
    else:
        assert result.recv_x.dtype == torch.bfloat16
    dispatcher.combine(torch.zeros(4, 8, H, dtype=torch.bfloat16), result.handle)
    # 4 pairs go to rank 1: a 16-byte header with the source index, then the row (bf16, or FP8 + fp32 per 128)
    row = H + H // 128 * 4 if use_fp8 else H * 2
    assert deepep.LL_MESSAGE_HEADER_BYTES == 16 and deepep.low_latency_row_bytes(H, use_fp8) == row
    assert dispatcher.traffic.as_tensor().tolist() == [4 * row, 0, 4 * 16, 4 * H * 2, 0, 0]


def test_fp8_pair_reaches_deep_gemms_masked_kernel_as_it_arrived(rec: Recorder, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_gemm", make_deep_gemm(rec))
    dispatcher = deepep.DeepEPLowLatencyDispatcher(_ep(), SPEC, use_fp8=True)
    x, idx, weights = _routing()
    result = dispatcher.dispatch(x, idx, weights)
    gen = torch.Generator().manual_seed(1)
    w13, w2 = (quantize_block_fp8(torch.randn(shape, generator=gen)) for shape in ((4, 256, H), (4, H, 128)))
    experts = LocalExperts(make_config(hidden_size=H, moe_intermediate_size=128).model, w13, w2, "deep_gemm")
    y = experts.run(result)
    first, second = rec.calls("fp8_masked")
    assert first[1] == (4, 8, H) and first[2] == result.recv_x[1].stride()  # DeepEP's MN-major scales, as they are
    assert second[1] == (4, 8, 128) and y.shape == (4, 8, H) and y.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="grouped_gemm: deep_gemm"):
        LocalExperts(make_config(hidden_size=H, moe_intermediate_size=128).model, w13, w2).run(result)
