"""Dispatch/combine backends behind one contract (see :mod:`epruntime.dispatch.base`)."""

from __future__ import annotations

from epruntime.dispatch.auto import AutoDispatcher
from epruntime.dispatch.base import Dispatcher, DispatchResult, MaskedDispatchResult, Traffic, traffic_report
from epruntime.dispatch.deepep import DeepEPDispatcher, DeepEPLowLatencyDispatcher
from epruntime.dispatch.flat import FlatDispatcher
from epruntime.dispatch.hierarchical import HierarchicalDispatcher
from epruntime.dispatch.local import LocalDispatcher
from epruntime.dispatch.lowlatency import LowLatencyDispatcher
from epruntime.parallel.runtime import Runtime

BACKENDS: dict[str, type[Dispatcher]] = {"flat": FlatDispatcher, "hierarchical": HierarchicalDispatcher}
BACKENDS.update(
    lowlatency=LowLatencyDispatcher,
    deepep=DeepEPDispatcher,
    deepep_low_latency=DeepEPLowLatencyDispatcher,
    auto=AutoDispatcher,
)
MOVES_ROWS = ("flat", "hierarchical")  # torch.distributed backends with nothing to do on a one-rank EP world


def make_dispatcher(rt: Runtime, name: str | None = None) -> Dispatcher:
    """The dispatcher named by ``runtime.dispatcher`` (or ``name``), bound to this rank's groups; on a
    one-rank EP world ``flat`` and ``hierarchical`` skip communication (:class:`LocalDispatcher`)."""
    name = name or rt.cfg.runtime.dispatcher
    if name in MOVES_ROWS and rt.world_size == 1:
        return LocalDispatcher(rt, name)
    return BACKENDS[name](rt)


__all__ = [
    "BACKENDS",
    "DispatchResult",
    "Dispatcher",
    "MaskedDispatchResult",
    "Traffic",
    "make_dispatcher",
    "traffic_report",
]
