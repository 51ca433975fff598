"""Building a dispatcher from its declaration in the one list (:mod:`epruntime.config.dispatchers`, re-exported
here): the backend's module is imported only now."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from epruntime.config.dispatchers import (
    BACKENDS,
    MASKED,
    NAMES,
    NORMAL,
    PER_CALL,
    Backend,
    backend,
    check_dispatcher,
    check_dispatcher_machine,
    names_where,
    table_markdown,
)

if TYPE_CHECKING:
    from epruntime.dispatch.base import Dispatcher, DispatchSpec
    from epruntime.parallel.layout import EPView

__all__ = [
    "BACKENDS",
    "MASKED",
    "NAMES",
    "NORMAL",
    "PER_CALL",
    "Backend",
    "backend",
    "check_dispatcher",
    "check_dispatcher_machine",
    "make_dispatcher",
    "names_where",
    "table_markdown",
]


def _import(path: str) -> type:
    """The class a declaration's ``module:Class`` names in this package."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"epruntime.dispatch.{module}"), name)


def make_dispatcher(name: str, ep: EPView, spec: DispatchSpec, **options: object) -> Dispatcher:
    """The dispatcher ``name`` bound to the EP world ``ep``, given those of ``options`` it declares (e.g. DeepEP's
    ``num_sms``, ``use_fp8``); on a one-rank EP world the backends that would move rows to themselves skip
    communication (:class:`~epruntime.dispatch.local.LocalDispatcher`)."""
    declared = backend(name)
    if declared.local_on_one_rank and ep.world_size == 1:
        return _import("local:LocalDispatcher")(ep, spec, name)
    return _import(declared.factory)(ep, spec, **{k: v for k, v in options.items() if k in declared.options})
