"""Failure handling: the stage each rank is in, a hang watchdog, and messages naming the failed rank.

Every rank runs one :class:`Watchdog` (started by ``init_runtime``). Code marks what it is doing
with ``with stage("dispatch: inter-node (rail)"):``; the watchdog ends the rank with a message
naming the stage when one lasts longer than 1.5 x ``runtime.timeout_s`` (the collectives
themselves time out at ``runtime.timeout_s``). A rank that fails posts why in the job's rendezvous
store before it exits; a rank whose collective fails then names it (:func:`describe_failure`):
the rank that posted a failure, or else the ranks that posted nothing at all (dead, e.g. killed).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

T = TypeVar("T")
POLL_S = 1.0  # watchdog period
SETTLE_S = 1.0  # how long a failed rank waits for the others' reports
_PREFIX = "epruntime/"


class RankFailure(RuntimeError):
    """A collective failed because another rank died, raised, or stopped answering."""


class Watchdog:
    """Tracks this process's current stage, heartbeats into the store and guards against hangs."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.limit_s = float("inf")
        self.store: Any = None
        self.current = "start-up"
        self.failed_in: str | None = None  # the innermost stage an exception left, kept for the message
        self.since = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self, rank: int, world_size: int, timeout_s: float) -> None:
        """Begin heartbeats and hang detection for this rank (idempotent)."""
        self.rank, self.world_size, self.limit_s = rank, world_size, 1.5 * timeout_s
        self.store = _default_store()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="epruntime-watchdog", daemon=True)
            self._thread.start()
            _report_on_sigterm(self)

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            stuck = time.monotonic() - self.since
            if self.current != "idle" and stuck > self.limit_s:
                print(
                    f"[rank {self.rank}] stuck in {self.current} for {stuck:.0f} s (limit 1.5 x runtime.timeout_s); "
                    f"ending this rank",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)

    def post(self, kind: str, message: str) -> bool:
        """Publish ``failed`` (this rank's own failure) or ``victim`` (a peer's) in the store."""
        if self.store is None:
            return False
        try:
            self.store.set(f"{_PREFIX}{kind}/{self.rank}", message)
            return True
        except Exception:  # the store host (rank 0) is gone
            return False


WATCHDOG = Watchdog()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark what this rank is doing; a mark inside another reads ``outer > inner`` (restored on exit)."""
    outer, outer_since = WATCHDOG.current, WATCHDOG.since
    nested = outer not in ("idle", "start-up")
    if not nested:
        WATCHDOG.failed_in = None
    WATCHDOG.current, WATCHDOG.since = f"{outer} > {name}" if nested else name, time.monotonic()
    try:
        yield
    except BaseException:
        WATCHDOG.failed_in = WATCHDOG.failed_in or WATCHDOG.current  # the innermost stage that failed
        raise
    finally:
        WATCHDOG.current, WATCHDOG.since = outer, outer_since


def _default_store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a torch without the accessor
        return None


def _report_on_sigterm(dog: Watchdog) -> None:
    """When the launcher stops this rank (another one failed), say which stage it was in."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        print(f"[rank {dog.rank}] stopped by the launcher while in {dog.current}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _failed_rank(dog: Watchdog) -> str:
    """Who failed: a rank that posted its own failure, else the ranks that posted nothing (dead)."""
    unreachable = "the rendezvous store on rank 0 is unreachable, so rank 0 may be the one that died"
    if not dog.post("victim", dog.failed_in or dog.current):
        return unreachable
    others = [r for r in range(dog.world_size) if r != dog.rank]
    deadline = time.monotonic() + SETTLE_S
    try:
        while True:
            for rank in others:
                if dog.store.check([f"{_PREFIX}failed/{rank}"]):
                    return f"rank {rank} failed: {dog.store.get(f'{_PREFIX}failed/{rank}').decode()}"
            silent = [r for r in others if not dog.store.check([f"{_PREFIX}victim/{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:
        return unreachable
    if silent:
        return f"no word from rank(s) {silent}: presumed dead"
    return "every rank saw the failure; none reported a cause (a timeout?)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def describe_failure(exc: BaseException) -> str:
    """One line for a failed collective: this rank, the stage it was in, and the rank that failed."""
    where = WATCHDOG.failed_in or WATCHDOG.current
    return f"rank {WATCHDOG.rank}: {where} failed; {_failed_rank(WATCHDOG)} ({_first_line(exc)})"


def report_own_failure(exc: BaseException) -> str:
    """Post this rank's own error (not caused by a peer) for the others; return its one-line message."""
    message = f"{type(exc).__name__} in {WATCHDOG.failed_in or WATCHDOG.current}: {_first_line(exc)}"
    WATCHDOG.post("failed", message)
    return f"rank {WATCHDOG.rank}: {message}"


class NonFiniteError(FloatingPointError):
    """NaN or Inf found in activations while ``runtime.check_finite`` is on."""


# What gloo's and NCCL's plain RuntimeErrors say when a peer died, hung or left (torch wraps only some of them
# in DistError): a connection closed or reset, a timed-out wait, or the backend naming itself.
_COLLECTIVE_MESSAGE = re.compile(
    r"gloo|nccl|ProcessGroup|[Cc]onnection (closed|reset|refused)|[Tt]imed out|[Bb]roken pipe"
)


def is_collective_failure(exc: BaseException) -> bool:
    """Errors a collective raises when a peer died, raised or timed out: torch's DistError, or a plain
    RuntimeError from the backend saying so. A local bug (a shape error is a plain RuntimeError too) is not."""
    if isinstance(exc, dist.DistError):
        return True
    return type(exc) is RuntimeError and _COLLECTIVE_MESSAGE.search(str(exc)) is not None


@contextmanager
def failures_named() -> Iterator[None]:
    """Inside: a failed collective becomes a :class:`RankFailure` naming the stage and the rank that failed;
    any other error of this rank is posted for its peers, then propagates."""
    try:
        yield
    except RankFailure:
        raise
    except Exception as exc:
        if is_collective_failure(exc):
            raise RankFailure(describe_failure(exc)) from exc
        report_own_failure(exc)
        raise


def check_tp_tokens(num_tokens: int, group: dist.ProcessGroup, tp_size: int) -> None:
    """The ranks of one expert-TP group share their tokens, so they must hold the same number: one 16-byte
    host all-reduce (gloo, no device sync) finds a mismatch and every rank of the group raises alike."""
    bounds = torch.tensor([num_tokens, -num_tokens], dtype=torch.int64)  # [2] max and -min after the reduce
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    most, fewest = bounds[0].item(), -bounds[1].item()
    if most != fewest:
        raise ValueError(
            f"runtime.moe_tp: the {tp_size} ranks of an expert-TP group share their tokens and must each get the "
            f"same number, got between {fewest} and {most} (this rank {num_tokens}); give every rank of a TP group "
            f"the same batch"
        )


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's ``mine`` concatenated into ``out`` (``all_gather_single`` where torch has it, else its older
    name ``all_gather_into_tensor``: GPU images ship torch builds from before the rename)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def assert_finite_on_all_ranks(t: torch.Tensor, what: str, group: dist.ProcessGroup) -> None:
    """Every rank checks its tensor; all ranks raise together, naming each rank with NaN/Inf values."""
    bad = (~torch.isfinite(t)).sum().reshape(1).to(torch.int64)  # [1]
    counts = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=t.device)  # [W]
    all_gather_flat(counts, bad, group)
    culprits = [f"rank {r} ({n} values)" for r, n in enumerate(counts.tolist()) if n]
    if culprits:
        raise NonFiniteError(
            f"{what}: NaN/Inf on {', '.join(culprits)} (runtime.check_finite); check the inputs of that rank"
        )


def finite_check_hooks(layer: nn.Module, group: dist.ProcessGroup) -> list[RemovableHandle]:
    """Forward hooks on ``layer`` checking its input and output on every rank of ``group``
    (``runtime.check_finite``); the messages name ``layer.label``. Remove the handles to turn it off."""

    def check_input(module: nn.Module, args: tuple) -> None:
        assert_finite_on_all_ranks(args[0], f"{module.label} input", group)

    def check_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        assert_finite_on_all_ranks(out, f"{module.label} output", group)

    return [layer.register_forward_pre_hook(check_input), layer.register_forward_hook(check_output)]


def run_or_exit(fn: Callable[[], T]) -> T:
    """Run a rank's job; on any error print one line naming this rank, the stage and the culprit, and end
    the process at once with status 1 (never waiting on peers that may be gone)."""
    try:
        return fn()
    except Exception as exc:
        if isinstance(exc, RankFailure):
            message = str(exc)
        elif is_collective_failure(exc):
            message = describe_failure(exc)
        else:
            message = report_own_failure(exc)
        print(f"[rank {WATCHDOG.rank}] error: {message}", file=sys.stderr, flush=True)
        if WATCHDOG.rank == 0 and WATCHDOG.world_size > 1:
            time.sleep(SETTLE_S)  # rank 0 hosts the store: let the others read the failure reports first
        os._exit(1)
