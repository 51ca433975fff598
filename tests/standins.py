"""Recording stand-ins for ``deep_ep``, ``deep_gemm`` and ``torch.cuda``'s streams and graphs, for CPU tests.

Each stand-in writes what it is asked into one :class:`Recorder` (in call order, with the arguments that
matter and the stream the host was issuing on) and returns tensors of the shapes and dtypes the real
library returns, so the runtime's code around them runs unchanged. ``deep_ep`` follows ``deep_ep.Buffer``
at the commit docker/Dockerfile pins; its transfers are those of a world where the peers send nothing
(this rank receives its own tokens). ``deep_gemm`` computes its GEMMs in fp32 on the CPU.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from epruntime.io.fp8 import dequantize_block_fp8


class Recorder:
    """The ordered log of every stand-in call, and the stream (and capture state) the host is on."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.stream = "main"
        self.capturing = False

    def add(self, *entry: Any) -> None:
        self.log.append(entry)

    def calls(self, name: str) -> list[tuple]:
        return [e for e in self.log if e[0] == name]

    def names(self) -> list[str]:
        return [e[0] for e in self.log]


def make_deep_ep(rec: Recorder, world: int, rank: int) -> types.ModuleType:
    """A ``deep_ep`` module whose ``Buffer`` records into ``rec``, for EP rank ``rank`` of ``world``."""

    class EventOverlap:
        def __init__(self, name: str) -> None:
            self.name = name

        def current_stream_wait(self) -> None:
            rec.add("wait", self.name, rec.stream)

    class Config:
        def __init__(self, num_sms: int, nvl_send: int, nvl_recv: int, rdma_send: int = 6, rdma_recv: int = 128):
            self.num_sms, self.nvl_recv, self.rdma_recv = num_sms, nvl_recv, rdma_recv

        def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:  # one channel per 2 SMs
            return self.num_sms // 2 * min(num_ranks, 8) * self.nvl_recv * hidden_bytes

        def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
            return 0 if num_ranks <= 8 else self.num_sms // 2 * (num_ranks // 8) * self.rdma_recv * hidden_bytes * 2

    def _hook(name: str) -> Callable[[], None]:
        return lambda: rec.add("hook", name, rec.stream)

    class Buffer:
        num_sms = 20

        def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24, **kw):
            self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
            self.low_latency_mode, self.kwargs = low_latency_mode, kw
            rec.add("new", num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)

        @staticmethod
        def set_num_sms(new_num_sms: int) -> None:
            assert new_num_sms % 2 == 0, "The SM count must be even"
            Buffer.num_sms = new_num_sms
            rec.add("set_num_sms", new_num_sms)

        @staticmethod
        def get_dispatch_config(num_ranks: int) -> Config:
            return Config(Buffer.num_sms, 6, 256)

        @staticmethod
        def get_combine_config(num_ranks: int) -> Config:
            return Config(Buffer.num_sms, 4, 256)

        @staticmethod
        def capture() -> EventOverlap:
            rec.add("capture", rec.stream)
            return EventOverlap(f"captured on {rec.stream}")

        @staticmethod
        def get_low_latency_rdma_size_hint(tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
            return 2 * num_experts * tokens * (hidden * 2 + 16)

        def clean_low_latency_buffer(self, *args: int) -> None:
            rec.add("clean", *args)

        def destroy(self) -> None:
            assert self.kwargs.get("explicitly_destroy"), "destroy() needs explicitly_destroy=True"
            rec.add("destroy", self.num_nvl_bytes, self.num_rdma_bytes)

        def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                                allocate_on_comm_stream=False):  # fmt: skip
            rec.add("get_dispatch_layout", getattr(previous_event, "name", None), async_finish,
                    allocate_on_comm_stream, rec.stream)  # fmt: skip
            dest = torch.where(topk_idx >= 0, topk_idx // (num_experts // world), world)  # [T, K]
            in_rank = (dest.unsqueeze(2) == torch.arange(world)).any(dim=1)  # [T, W]
            per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
            return in_rank.sum(dim=0).int(), None, per_expert, in_rank, EventOverlap("laid out")

        def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                     is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                     expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                     allocate_on_comm_stream=False):  # fmt: skip
            rec.add("dispatch", getattr(previous_event, "name", None), async_finish, allocate_on_comm_stream,
                    getattr(config, "num_sms", None), expert_alignment, rec.stream)  # fmt: skip
            mine = is_token_in_rank[:, rank]  # [T] this rank's own tokens that need one of its experts
            e_local = num_tokens_per_expert.numel() // world
            local = topk_idx[mine] - rank * e_local
            local = torch.where((local >= 0) & (local < e_local) & (topk_idx[mine] >= 0), local, -1)
            per_local = [int((local == e).sum()) for e in range(e_local)]
            return x[mine], local, topk_weights[mine], per_local, ("normal handle", mine), EventOverlap("dispatched")

        def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                    async_finish=False, allocate_on_comm_stream=False):  # fmt: skip
            rec.add("combine", getattr(previous_event, "name", None), async_finish, allocate_on_comm_stream,
                    getattr(config, "num_sms", None), rec.stream)  # fmt: skip
            mine = handle[1]
            out = x.new_zeros(len(mine), x.shape[1])
            out[mine] = x
            return out, None, EventOverlap("combined")

        def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                 use_fp8=True, return_recv_hook=False, **kw):  # fmt: skip
            rec.add("low_latency_dispatch", use_fp8, return_recv_hook, rec.stream, rec.capturing)
            e_local, c, h = num_experts // world, num_max_dispatch_tokens_per_rank * world, x.shape[1]
            mine = (topk_idx >= rank * e_local) & (topk_idx < (rank + 1) * e_local)  # [T, K]
            count = torch.bincount(topk_idx[mine] - rank * e_local, minlength=e_local).int()
            recv: Any = torch.zeros(e_local, c, h, dtype=torch.bfloat16)
            if use_fp8:
                scales = torch.ones(e_local, h // 128, c).transpose(1, 2)  # [E_local, C, H / 128], MN-major
                recv = (recv.to(torch.float8_e4m3fn), scales)
            return recv, count, ("low-latency handle",), EventOverlap("ll dispatched"), _hook("ll dispatch")

        def low_latency_combine(self, x, topk_idx, topk_weights, handle, return_recv_hook=False, **kw):
            rec.add("low_latency_combine", return_recv_hook, rec.stream, rec.capturing)
            combined = torch.zeros(topk_idx.shape[0], x.shape[-1], dtype=torch.bfloat16)
            return combined, EventOverlap("ll combined"), _hook("ll combine")

    module = types.ModuleType("deep_ep")
    module.Buffer, module.Config, module.EventOverlap, module.topk_idx_t = Buffer, Config, EventOverlap, torch.int64
    return module


def _per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # [..., K] fp8, [..., K/128] -> fp32
    return q.float() * scale.float().repeat_interleave(128, dim=-1)[..., : q.shape[-1]]


def make_deep_gemm(rec: Recorder, alignment: int = 128) -> types.ModuleType:
    """A ``deep_gemm`` module with the kernels epruntime calls, computed in fp32 and recorded into ``rec``."""

    def get_mk_alignment_for_contiguous_layout() -> int:
        return alignment

    def m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices, disable_ue8m0_cast=False, **kw) -> None:
        rec.add("fp8_contiguous", tuple(a[0].shape), m_indices.dtype, disable_ue8m0_cast)
        assert a[0].dtype == torch.float8_e4m3fn and m_indices.dtype == torch.int32 and d.dtype == torch.bfloat16
        assert a[0].shape[0] % alignment == 0, "the contiguous layout pads every expert to the alignment"
        x, w = _per_token(*a), dequantize_block_fp8(*b, dtype=torch.float32)
        for e in range(w.shape[0]):
            rows = m_indices == e
            d[rows] = (x[rows] @ w[e].t()).to(d.dtype)

    def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, disable_ue8m0_cast=False, **kw) -> None:
        rec.add("fp8_masked", tuple(a[0].shape), a[1].stride(), masked_m.dtype, expected_m)
        assert masked_m.dtype == torch.int32 and d.dtype == torch.bfloat16 and expected_m > 0
        x, w = _per_token(*a), dequantize_block_fp8(*b, dtype=torch.float32)
        for e, m in enumerate(masked_m.tolist()):
            d[e, :m] = (x[e, :m] @ w[e].t()).to(d.dtype)

    def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims="nk") -> None:
        rec.add("bf16_masked", tuple(a.shape), tuple(b.shape), masked_m.dtype, expected_m)
        assert a.dtype == b.dtype == d.dtype == torch.bfloat16 and a.is_contiguous() and b.is_contiguous()
        assert masked_m.dtype == torch.int32 and masked_m.is_contiguous() and expected_m > 0
        for e, m in enumerate(masked_m.tolist()):
            d[e, :m] = (a[e, :m].float() @ b[e].float().t()).to(d.dtype)

    module = types.ModuleType("deep_gemm")
    for fn in (
        get_mk_alignment_for_contiguous_layout,
        m_grouped_fp8_gemm_nt_contiguous,
        m_grouped_fp8_gemm_nt_masked,
        m_grouped_bf16_gemm_nt_masked,
    ):
        setattr(module, fn.__name__, fn)
    return module


class FakeStream:
    """A CUDA stream by name; ``wait_stream`` is recorded."""

    def __init__(self, rec: Recorder, name: str = "side") -> None:
        self.rec, self.name = rec, name

    def wait_stream(self, other: FakeStream) -> None:
        self.rec.add("stream_wait", self.name, other.name)


class FakeGraph:
    """``torch.cuda.CUDAGraph``: a replay runs no Python, it is only recorded."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def replay(self) -> None:
        self.rec.add("replay")


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch, rec: Recorder) -> None:
    """Streams, stream contexts and graph capture of ``torch.cuda`` as recording stand-ins (no CUDA needed)."""

    @contextmanager
    def stream(s: FakeStream) -> Iterator[None]:
        outer, rec.stream = rec.stream, s.name
        try:
            yield
        finally:
            rec.stream = outer

    @contextmanager
    def graph(g: FakeGraph, **kw: Any) -> Iterator[None]:
        rec.add("capture_begin")
        rec.capturing = True
        try:
            yield
        finally:
            rec.capturing = False
            rec.add("capture_end")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(rec, rec.stream))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **kw: FakeStream(rec))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: FakeGraph(rec))


def install_recording_deep_ep(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """deep_ep for rank 0 of 2 (one node), the EP group's barrier and torch.cuda's streams, all recording."""
    import sys

    from epruntime.dispatch import deepep

    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "deep_ep", make_deep_ep(recorder, world=2, rank=0))
    monkeypatch.setattr(deepep.dist, "barrier", lambda group=None, **kw: recorder.add("barrier", group))
    install_fake_cuda(monkeypatch, recorder)
    return recorder
