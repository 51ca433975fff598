"""Dispatch/combine backends behind one contract (see :mod:`epruntime.dispatch.base`)."""

from __future__ import annotations

from ..runtime import Runtime
from .base import DispatchResult, Dispatcher, Traffic, traffic_report
from .flat import FlatDispatcher

BACKENDS: dict[str, type[Dispatcher]] = {"flat": FlatDispatcher}


def make_dispatcher(rt: Runtime, name: str | None = None) -> Dispatcher:
    """The dispatcher named by ``runtime.dispatcher`` (or ``name``), bound to this rank's groups."""
    return BACKENDS[name or rt.cfg.runtime.dispatcher](rt)


__all__ = ["BACKENDS", "DispatchResult", "Dispatcher", "Traffic", "make_dispatcher", "traffic_report"]
