"""``deepep`` and ``deepep_low_latency``: DeepEP's normal and low-latency kernels (NVLink, RDMA, NVSHMEM).

Written against DeepEP's ``deep_ep.Buffer`` API at the commit docker/Dockerfile builds:

- ``deepep`` (normal mode, prefill): ``get_dispatch_layout`` then ``dispatch``, which returns each
  token once per destination rank with its top-k made local (-1 elsewhere) and the received count
  per local expert: exactly :class:`DispatchResult`. Both are issued asynchronously on DeepEP's
  communication stream (``previous_event`` = an event of the current stream, ``async_finish``,
  ``allocate_on_comm_stream``); ``dispatch_b`` makes the current stream wait for them, so work
  launched in between (the shared expert) overlaps the transfer. ``combine`` is DeepEP's unweighted
  sum back to the source tokens, issued the same way. The normal kernels take ``num_sms`` SMs, and
  the buffer is sized for that count.
- ``deepep_low_latency`` (decode): ``low_latency_dispatch`` (fixed ``max_tokens_per_rank``) gives
  ``[E_local, max_tokens_per_rank * W, H]`` plus ``recv_count`` per expert, i.e.
  :class:`MaskedDispatchResult`: bf16 rows, or with ``use_fp8`` the FP8 pair ``(q [E_local, C, H],
  scale [E_local, C, H / 128])`` that DeepGEMM's masked FP8 kernel takes (half the bytes). The
  masked expert stage returns unweighted outputs and ``low_latency_combine`` applies the routing
  weights. Dispatch and combine return before the data has arrived (``return_recv_hook``): the hook
  runs in ``dispatch_b``/``combine_b``.

One ``deep_ep.Buffer`` per process and group serves every layer (:class:`SharedBuffer`). Each dispatcher
reserves what it needs from DeepEP's size hints when it is built; the buffer is allocated on first use for
all the reservations, after one barrier over the group (so no rank starts DeepEP's ~100 s clocks while a
peer is still warming up). Normal-mode calls mark the low-latency area dirty, and it is cleaned before the
next low-latency call, as DeepEP requires (also before a CUDA-graph replay: see
:mod:`epruntime.layer.cuda_graph`). Buffers are destroyed explicitly, by every rank together: before one is
rebuilt larger, and in ``end_rank`` (never on an error path, where a dead peer would leave the others in
DeepEP's barrier). ``import deep_ep`` happens only when one of these dispatchers is built, so this module
imports without DeepEP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from epruntime.dispatch.base import (
    AsyncDispatcher,
    DispatchResult,
    DispatchSpec,
    InFlight,
    MaskedDispatchResult,
)
from epruntime.dispatch.lowlatency import check_capacity
from epruntime.parallel.layout import EPView

NORMAL_QPS = 24  # DeepEP's default QPs per rank for internode normal mode
DEFAULT_NUM_SMS = 20  # deep_ep.Buffer.num_sms: the SMs DeepEP's normal kernels take unless set_num_sms changes it
# A low-latency dispatch message is a 16-byte header (an int4 whose first int is the source token index) and
# the row: csrc/kernels/internode_ll.cu, num_bytes_per_msg = sizeof(int4) + (FP8 ? H + H / 128 * 4 : H * 2).
# A combine message is the bf16 row alone (without LogFMT).
LL_MESSAGE_HEADER_BYTES = 16
FP8_SCALE_GROUP = 128  # channels per fp32 scale in DeepEP's FP8 dispatch


def low_latency_row_bytes(hidden: int, use_fp8: bool) -> int:
    """Bytes of one low-latency dispatch row after the header: bf16, or FP8 values plus one fp32 per 128."""
    return hidden + hidden // FP8_SCALE_GROUP * 4 if use_fp8 else hidden * 2


@dataclass
class SharedBuffer:
    """The one ``deep_ep.Buffer`` of a process group, sized for every reservation made before first use."""

    group: dist.ProcessGroup
    num_nvl_bytes: int = 0
    num_rdma_bytes: int = 0
    low_latency: tuple[int, int, int] | None = None  # (max tokens per rank, hidden, experts) when reserved
    num_qps_per_rank: int = 1
    buffer: Any = None
    buffer_qps: int = 0  # the QPs per rank the current buffer was built with
    dirty: bool = False  # a normal-mode call ran since the low-latency area was last clean

    def reserve(self, nvl: int = 0, rdma: int = 0, qps: int = 1, low_latency: tuple[int, int, int] | None = None):
        """Grow the sizes the buffer will be allocated with (reallocated if it already exists and is too small)."""
        self.num_nvl_bytes, self.num_rdma_bytes = max(self.num_nvl_bytes, nvl), max(self.num_rdma_bytes, rdma)
        self.num_qps_per_rank = max(self.num_qps_per_rank, qps)
        self.low_latency = self.low_latency or low_latency
        buf = self.buffer
        if buf is not None and (
            buf.num_nvl_bytes < self.num_nvl_bytes
            or buf.num_rdma_bytes < self.num_rdma_bytes
            or buf.low_latency_mode != (self.low_latency is not None)
            or self.buffer_qps < self.num_qps_per_rank
        ):
            self.release()

    def release(self) -> None:
        """Destroy the buffer now (collective: every rank of the group calls it at the same point)."""
        if self.buffer is not None:
            self.buffer.destroy()
            self.buffer = None

    def _build(self) -> Any:
        """A new ``deep_ep.Buffer`` for all reservations, once every rank of the group has arrived."""
        import deep_ep

        # torch.distributed's timeout (runtime.timeout_s) absorbs a slow rank's start-up (weight loading, the
        # experts' warm-up JIT), so DeepEP's own ~100 s timeouts never count it.
        dist.barrier(group=self.group)
        buffer = deep_ep.Buffer(
            self.group,
            self.num_nvl_bytes,
            self.num_rdma_bytes,
            low_latency_mode=self.low_latency is not None,
            num_qps_per_rank=self.num_qps_per_rank,
            explicitly_destroy=True,  # DeepEP's destructor can hang Python's exception handling
        )
        self.buffer_qps, self.dirty = self.num_qps_per_rank, False  # a new buffer starts zeroed
        return buffer

    def clean_if_dirty(self) -> None:
        """Zero the low-latency area if a normal-mode call ran since it was last clean (DeepEP requires it
        before any low-latency kernel); a no-op otherwise."""
        if self.dirty and self.buffer is not None and self.low_latency is not None:
            self.buffer.clean_low_latency_buffer(*self.low_latency)
        self.dirty = False

    def use(self, mode: str) -> Any:
        """The buffer for one ``normal`` or ``low_latency`` call, allocated (collectively) on first use."""
        if self.buffer is None:
            self.buffer = self._build()
        if mode == "normal":
            self.dirty = True  # the normal kernels write where the low-latency ones expect zeros
        else:
            self.clean_if_dirty()
        return self.buffer


def shared_buffer(ep: EPView) -> SharedBuffer:
    """The :class:`SharedBuffer` of ``ep``'s world, kept in ``ep.resources`` and released by ``end_rank``."""
    return ep.resources.setdefault("deepep", SharedBuffer(ep.world))


class _DeepEPBase(AsyncDispatcher):
    def __init__(self, ep: EPView, spec: DispatchSpec) -> None:
        super().__init__(ep, spec)
        import deep_ep

        self.deep_ep = deep_ep
        self.buffers = shared_buffer(ep)
        self.num_experts = spec.num_experts

    def _topk_idx(self, topk_idx: torch.Tensor) -> torch.Tensor:
        return topk_idx.to(self.deep_ep.topk_idx_t).contiguous()


@dataclass
class DeepEPHandle:
    """DeepEP's normal-mode handle, and the rows sent to each rank (for the traffic counters)."""

    handle: tuple
    sent_per_rank: torch.Tensor  # [W] int32 on the device: rows sent to each rank


class DeepEPDispatcher(_DeepEPBase):
    """DeepEP normal mode: the flat contract on NVLink/RDMA kernels, asynchronous on DeepEP's stream."""

    name = "deepep"

    def __init__(self, ep: EPView, spec: DispatchSpec, num_sms: int = DEFAULT_NUM_SMS) -> None:
        super().__init__(ep, spec)
        if num_sms <= 0 or num_sms % 2:
            raise ValueError(f"deepep: num_sms must be a positive even number (DeepEP pairs SMs), got {num_sms}")
        buffer_cls, world = self.deep_ep.Buffer, ep.world_size
        buffer_cls.set_num_sms(num_sms)  # the config table reads Buffer.num_sms, and the size hints its channels
        # Kept and passed to every call: Buffer.num_sms is process-wide, the buffer is sized for these configs.
        self.dispatch_config = buffer_cls.get_dispatch_config(world)
        self.combine_config = buffer_cls.get_combine_config(world)
        hidden_bytes = spec.hidden_size * 2  # bf16 rows
        configs = (self.dispatch_config, self.combine_config)
        self.buffers.reserve(
            nvl=max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs),
            rdma=max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs),
            qps=NORMAL_QPS,
        )

    def _count_rows(self, phase: str, per_rank: torch.Tensor, row_bytes: int, meta_bytes: int) -> None:
        """Rows sent to each rank (``per_rank [W]`` on the device) into the on-device counters: no host sync."""
        intra, inter = (self._link_of_rank * per_rank.long()).sum(dim=1)  # rows crossing each link
        link_bytes = torch.stack([intra * row_bytes, inter * row_bytes, (intra + inter) * meta_bytes])  # LINKS order
        self.traffic.add_on_device(phase, link_bytes)

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        buf = self.buffers.use("normal")
        idx = self._topk_idx(topk_idx)
        issued = self.deep_ep.Buffer.capture()  # the router's outputs are ready on the current stream
        per_rank, per_rdma_rank, per_expert, in_rank, laid_out = buf.get_dispatch_layout(
            idx, self.num_experts, previous_event=issued, async_finish=True, allocate_on_comm_stream=True
        )
        # The host returns once the counts have arrived (DeepEP reads them to size recv_x); the rows are in flight.
        recv_x, recv_idx, recv_weights, per_local_expert, handle, done = buf.dispatch(
            x.contiguous(),
            topk_idx=idx,
            topk_weights=topk_weights.float().contiguous(),
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            config=self.dispatch_config,
            previous_event=laid_out,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        meta_bytes = topk_idx.shape[1] * (idx.element_size() + 4)  # each row's top-k ids and weights

        def arrived() -> DispatchResult:
            done.current_stream_wait()  # the current stream may now read what dispatch wrote
            self._count_rows("dispatch", per_rank, x.shape[1] * 2, meta_bytes)
            return DispatchResult(
                recv_x=recv_x,
                recv_topk_idx=recv_idx.long(),
                recv_topk_weights=recv_weights,
                tokens_per_expert=torch.tensor(per_local_expert, dtype=torch.int64, device=x.device),
                handle=DeepEPHandle(handle, per_rank),
            )

        return InFlight([], arrived)

    def combine_a(self, y: torch.Tensor, handle: DeepEPHandle) -> InFlight:
        issued = self.deep_ep.Buffer.capture()  # the expert outputs are ready on the current stream
        combined, _, done = self.buffers.use("normal").combine(
            y.contiguous(),
            handle.handle,
            config=self.combine_config,
            previous_event=issued,
            async_finish=True,
            allocate_on_comm_stream=True,
        )  # [T, H] unweighted sum

        def arrived() -> torch.Tensor:
            done.current_stream_wait()
            # Combine returns along the dispatch links: summed over all ranks, these are the bytes combine moves.
            self._count_rows("combine", handle.sent_per_rank, y.shape[1] * 2, 0)
            return combined

        return InFlight([], arrived)


@dataclass
class DeepEPLowLatencyHandle:
    """DeepEP's low-latency handle plus the source routing that ``low_latency_combine`` weights with."""

    handle: tuple
    topk_idx: torch.Tensor  # [T, K] deep_ep.topk_idx_t
    topk_weights: torch.Tensor  # [T, K] fp32


class DeepEPLowLatencyDispatcher(_DeepEPBase):
    """DeepEP low-latency mode: fixed capacity, no host sync, CUDA-graph safe. One message per (token, expert)
    pair each way (dispatch: 16-byte header and the bf16 row, or the FP8 row and its scales with ``use_fp8``;
    combine: the bf16 row), counted on the device."""

    name = "deepep_low_latency"

    def __init__(self, ep: EPView, spec: DispatchSpec, use_fp8: bool = False) -> None:
        super().__init__(ep, spec)
        self.capacity, self.use_fp8 = spec.capacity, use_fp8
        hidden, world = spec.hidden_size, ep.world_size
        self.buffers.reserve(  # the hint is computed for bf16, the larger of the two formats
            rdma=self.deep_ep.Buffer.get_low_latency_rdma_size_hint(self.capacity, hidden, world, self.num_experts),
            qps=self.num_experts // world,  # DeepEP: one QP per local expert
            low_latency=(self.capacity, hidden, self.num_experts),
        )

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        check_capacity(x.shape[0], self.capacity, self.name)
        idx = self._topk_idx(topk_idx)
        row_bytes = low_latency_row_bytes(x.shape[1], self.use_fp8)
        self.count_expert_sends("dispatch", idx, row_bytes, LL_MESSAGE_HEADER_BYTES)
        recv_x, recv_count, handle, _, hook = self.buffers.use("low_latency").low_latency_dispatch(
            x.contiguous(), idx, self.capacity, self.num_experts, use_fp8=self.use_fp8, return_recv_hook=True
        )  # [E_local, capacity * W, H] bf16, or (FP8 [E_local, C, H], fp32 [E_local, C, H / 128]); [E_local] int32
        result = MaskedDispatchResult(
            recv_x=recv_x,
            masked_m=recv_count,
            handle=DeepEPLowLatencyHandle(handle, idx, topk_weights.float().contiguous()),
        )

        def arrived() -> MaskedDispatchResult:
            hook()  # wait for the data: until here only the sends were issued
            return result

        return InFlight([], arrived)

    def combine_a(self, y: torch.Tensor, handle: DeepEPLowLatencyHandle) -> InFlight:
        self.count_expert_sends("combine", handle.topk_idx, y.shape[-1] * 2, 0)  # back along the same pairs
        combined, _, hook = self.buffers.use("low_latency").low_latency_combine(
            y.contiguous(), handle.topk_idx, handle.topk_weights, handle.handle, return_recv_hook=True
        )  # [T, H] bf16, weighted by topk_weights

        def arrived() -> torch.Tensor:
            hook()
            return combined

        return InFlight([], arrived)
