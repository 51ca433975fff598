"""CPU ranks that outnumber their cores run under SCHED_BATCH, gloo's threads included; others are left alone."""

from __future__ import annotations

import os
import threading

import pytest

from epruntime.parallel.cpu_sched import batch_scheduling_if_oversubscribed, cores_available
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import make_config

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


def _in_thread(local_ranks: int) -> tuple[bool, int]:
    """Apply the policy in a thread of its own (it is per thread), so this test process keeps its own."""
    out: list[tuple[bool, int]] = []
    thread = threading.Thread(
        target=lambda: out.append((batch_scheduling_if_oversubscribed(local_ranks), os.sched_getscheduler(0)))
    )
    thread.start()
    thread.join()
    return out[0]


def test_only_oversubscribed_ranks_switch_policy() -> None:
    assert _in_thread(cores_available()) == (False, os.sched_getscheduler(0))
    assert _in_thread(cores_available() + 1) == (True, os.SCHED_BATCH)


def _policies(rt: Runtime) -> set[int]:
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}


def test_every_thread_of_an_oversubscribed_rank_is_batch() -> None:
    cfg = make_config(2, 2)  # 4 ranks on this machine
    policies = run_world(_policies, cfg)
    expected = {os.SCHED_BATCH} if 4 > cores_available() else {os.sched_getscheduler(0)}
    assert policies == [expected] * 4
