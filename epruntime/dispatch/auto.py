"""``auto``: the normal backend for prefill-sized batches, the low-latency backend for decode-sized ones.

Decode-sized means every rank of the call has at most ``runtime.max_tokens_per_rank`` tokens: the
ranks agree on their largest batch with one all-reduce (MAX) per call, so all of them pick the same
backend. On GPUs the pair is DeepEP's (``deepep`` / ``deepep_low_latency``); on CPU it is ``flat`` /
``lowlatency``, so the policy itself runs in the CPU tests. That all-reduce reads a count on the
host, so a decode step captured in a CUDA graph names ``deepep_low_latency`` (or ``lowlatency``)
directly instead of ``auto``.
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
from epruntime.dispatch.deepep import DEFAULT_NUM_SMS, DeepEPDispatcher, DeepEPLowLatencyDispatcher
from epruntime.dispatch.flat import FlatDispatcher
from epruntime.dispatch.lowlatency import LowLatencyDispatcher
from epruntime.parallel.layout import EPView


@dataclass
class AutoHandle:
    """The backend that dispatched, and its handle."""

    backend: Dispatcher
    handle: Any


class AutoDispatcher(AsyncDispatcher):
    """Picks the low-latency backend when the largest batch of the call fits its capacity."""

    name = "auto"

    def __init__(self, ep: EPView, spec: DispatchSpec, num_sms: int = DEFAULT_NUM_SMS, use_fp8: bool = False) -> None:
        super().__init__(ep, spec)
        if ep.device.type == "cuda":  # DeepEP's pair, with its options
            self.normal: Dispatcher = DeepEPDispatcher(ep, spec, num_sms=num_sms)
            self.low_latency: Dispatcher = DeepEPLowLatencyDispatcher(ep, spec, use_fp8=use_fp8)
        else:
            self.normal, self.low_latency = FlatDispatcher(ep, spec), LowLatencyDispatcher(ep, spec)
        self.normal.traffic = self.low_latency.traffic = self.traffic
        self.threshold = spec.capacity

    def pick(self, num_tokens: int) -> Dispatcher:
        """The backend for a call where this rank has ``num_tokens`` tokens (collective over the world)."""
        largest = torch.tensor([num_tokens], dtype=torch.int64, device=self.ep.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.ep.world)
        return self.low_latency if int(largest.item()) <= self.threshold else self.normal

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        backend = self.pick(x.shape[0])
        inflight = backend.dispatch_a(x, topk_idx, topk_weights)

        def finish() -> DispatchResult | MaskedDispatchResult:
            result = backend.dispatch_b(inflight)
            result.handle = AutoHandle(backend, result.handle)
            return result

        return InFlight([], finish)

    def combine_a(self, y: torch.Tensor, handle: AutoHandle) -> InFlight:
        return handle.backend.combine_a(y, handle.handle)
