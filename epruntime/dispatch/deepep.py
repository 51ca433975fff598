"""``deepep`` and ``deepep_low_latency``: DeepEP's normal and low-latency kernels (NVLink, RDMA, NVSHMEM).

Written against DeepEP's ``deep_ep.Buffer`` API at the commit docker/Dockerfile builds:

- ``deepep`` (normal mode, prefill): ``get_dispatch_layout`` then ``dispatch``, which returns each
  token once per destination rank with its top-k made local (-1 elsewhere) and the received count
  per local expert: exactly :class:`DispatchResult`. The expert stage applies the weights, and
  ``combine`` is DeepEP's unweighted sum back to the source tokens, as in ``flat``.
- ``deepep_low_latency`` (decode): ``low_latency_dispatch`` (bf16, fixed ``max_tokens_per_rank``)
  gives ``[E_local, max_tokens_per_rank * W, H]`` plus ``recv_count`` per expert, i.e.
  :class:`MaskedDispatchResult`; the masked expert stage returns unweighted outputs and
  ``low_latency_combine`` applies the routing weights. Dispatch and combine return before the data
  has arrived (``return_recv_hook``): the hook runs in ``dispatch_b``/``combine_b``.

One ``deep_ep.Buffer`` per process and group serves every layer. Each dispatcher reserves what it
needs from DeepEP's size hints when it is built; the buffer is allocated on first use for all the
reservations (both modes when ``auto`` built both) and the low-latency part is cleaned whenever
the low-latency kernels follow the normal ones, as DeepEP requires. Buffers are destroyed explicitly,
by every rank together: before one is rebuilt larger, and in ``end_rank`` (never on an error path,
where a dead peer would leave the others in DeepEP's barrier). ``import deep_ep`` happens only
when one of these dispatchers is built, so this module imports without DeepEP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from epruntime.dispatch.base import (
    AsyncDispatcher,
    Dispatcher,
    DispatchResult,
    DispatchSpec,
    InFlight,
    MaskedDispatchResult,
)
from epruntime.dispatch.lowlatency import check_capacity
from epruntime.parallel.layout import EPView

NORMAL_QPS = 24  # DeepEP's default QPs per rank for internode normal mode
SOURCE_INDEX_BYTES = 4  # what a low-latency dispatch message carries besides the row: the source token index


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
    last_mode: str = ""

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

    def use(self, mode: str) -> Any:
        """The buffer for one ``normal`` or ``low_latency`` call, allocated (collectively) on first use."""
        import deep_ep

        if self.buffer is None:
            self.buffer = deep_ep.Buffer(
                self.group,
                self.num_nvl_bytes,
                self.num_rdma_bytes,
                low_latency_mode=self.low_latency is not None,
                num_qps_per_rank=self.num_qps_per_rank,
                explicitly_destroy=True,  # DeepEP's destructor can hang Python's exception handling
            )
            self.buffer_qps, self.last_mode = self.num_qps_per_rank, ""
        if mode == "low_latency" and self.last_mode == "normal":
            self.buffer.clean_low_latency_buffer(*self.low_latency)  # normal kernels dirty the LL area
        self.last_mode = mode
        return self.buffer


def shared_buffer(ep: EPView) -> SharedBuffer:
    """The :class:`SharedBuffer` of ``ep``'s world, kept in ``ep.resources`` and released by ``end_rank``."""
    return ep.resources.setdefault("deepep", SharedBuffer(ep.world))


class _DeepEPBase(Dispatcher):
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
    sent_per_rank: list[int]


class DeepEPDispatcher(_DeepEPBase):
    """DeepEP normal mode: the flat contract on NVLink/RDMA kernels."""

    name = "deepep"

    def __init__(self, ep: EPView, spec: DispatchSpec) -> None:
        super().__init__(ep, spec)
        buffer_cls, world = self.deep_ep.Buffer, ep.world_size
        hidden_bytes = spec.hidden_size * 2  # bf16 rows
        configs = (buffer_cls.get_dispatch_config(world), buffer_cls.get_combine_config(world))
        self.buffers.reserve(
            nvl=max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs),
            rdma=max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs),
            qps=NORMAL_QPS,
        )

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        buf = self.buffers.use("normal")
        idx = self._topk_idx(topk_idx)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, self.num_experts)
        recv_x, recv_idx, recv_weights, per_local_expert, handle, _ = buf.dispatch(
            x.contiguous(),
            topk_idx=idx,
            topk_weights=topk_weights.float().contiguous(),
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
        sent = per_rank.tolist()  # the dispatch has synchronised with the host already
        k = topk_idx.shape[1]
        self.count_sends(
            "dispatch", list(range(self.ep.world_size)), sent, x.shape[1] * 2, k * (idx.element_size() + 4)
        )
        return DispatchResult(
            recv_x=recv_x,
            recv_topk_idx=recv_idx.long(),
            recv_topk_weights=recv_weights,
            tokens_per_expert=torch.tensor(per_local_expert, dtype=torch.int64, device=x.device),
            handle=DeepEPHandle(handle, sent),
        )

    def combine(self, y: torch.Tensor, handle: DeepEPHandle) -> torch.Tensor:
        combined, _, _ = self.buffers.use("normal").combine(y.contiguous(), handle.handle)  # unweighted sum
        # Combine returns along the dispatch links: summed over all ranks, these are the bytes combine moves.
        self.count_sends("combine", list(range(self.ep.world_size)), handle.sent_per_rank, y.shape[1] * 2, 0)
        return combined


@dataclass
class DeepEPLowLatencyHandle:
    """DeepEP's low-latency handle plus the source routing that ``low_latency_combine`` weights with."""

    handle: tuple
    topk_idx: torch.Tensor  # [T, K] deep_ep.topk_idx_t
    topk_weights: torch.Tensor  # [T, K] fp32


class DeepEPLowLatencyDispatcher(_DeepEPBase, AsyncDispatcher):
    """DeepEP low-latency mode: fixed capacity, no host sync, CUDA-graph safe. One message per (token, expert)
    pair each way (bf16 row; dispatch adds the source index), counted on the device."""

    name = "deepep_low_latency"

    def __init__(self, ep: EPView, spec: DispatchSpec) -> None:
        super().__init__(ep, spec)
        self.capacity = spec.capacity
        hidden, world = spec.hidden_size, ep.world_size
        self.buffers.reserve(
            rdma=self.deep_ep.Buffer.get_low_latency_rdma_size_hint(self.capacity, hidden, world, self.num_experts),
            qps=ep.topo.experts_per_rank,  # DeepEP: one QP per local expert
            low_latency=(self.capacity, hidden, self.num_experts),
        )

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        check_capacity(x.shape[0], self.capacity, self.name)
        idx = self._topk_idx(topk_idx)
        self.count_expert_sends("dispatch", idx, x.shape[1] * 2, SOURCE_INDEX_BYTES)
        recv_x, recv_count, handle, _, hook = self.buffers.use("low_latency").low_latency_dispatch(
            x.contiguous(), idx, self.capacity, self.num_experts, use_fp8=False, return_recv_hook=True
        )  # [E_local, capacity * W, H] bf16, [E_local] int32
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
