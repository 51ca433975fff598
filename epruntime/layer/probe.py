"""What the layer calls at its stage boundaries: a :class:`Probe`. This one does nothing (the plain layer).

Instrumentation is opt-in: ``layer.probe = ...`` with one that marks stages for the watchdog
(:class:`StageMarks`) or also times them
(:class:`epruntime.cli.instruments.StageTimer`, which ``run`` and ``bench`` install). A probe must not
synchronize with the device inside a forward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from epruntime.parallel import health

STAGES = ("router", "dispatch", "experts", "combine", "shared", "total")  # "total" is the whole forward
_NOTHING = nullcontext()  # stateless and reentrant: one instance serves every stage


class Probe:
    """Hooks around one forward (``layer``) and each stage in it (``stage``); these do nothing."""

    def layer(self, label: str) -> AbstractContextManager[None]:
        """Around one whole forward of the layer named ``label`` (e.g. ``layer 7``)."""
        return _NOTHING

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Around one stage (one of :data:`STAGES`); a stage may be entered twice in a forward."""
        return _NOTHING


PLAIN = Probe()


class StageMarks(Probe):
    """Marks each forward and stage for the watchdog and failure messages (``layer 7 > dispatch``);
    no timing, no device sync."""

    def layer(self, label: str) -> AbstractContextManager[None]:
        return health.stage(label)

    def stage(self, name: str) -> AbstractContextManager[None]:
        return health.stage(name)
