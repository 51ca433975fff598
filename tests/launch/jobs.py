"""Run launch scripts as real process trees and check what they leave behind.

``start`` runs a command in its own session, so ``finish`` can stop the whole tree (agents and ranks)
if it outlives its deadline; ``verified`` reads the rank-0 JSON summary and checks the world it reports;
``failed_at_start`` checks a job that a config disagreeing with its launcher must stop at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
CPU_SIM = ROOT / "configs" / "cpu-sim.yaml"
# A short cpu-sim run: the launch is what is under test, not the layer's speed.
SHORT = ["--set", "runtime.iters=2", "--set", "runtime.warmup=1", "--set", "runtime.tokens_per_rank=64"]
# Two simulated or real nodes of two ranks each.
TWO_BY_TWO = ["--set", "topology.nnodes=2", "--set", "topology.ranks_per_node=2"]


@dataclass
class Result:
    """A finished process: exit status, stdout and stderr together, and seconds from start to exit."""

    returncode: int
    output: str
    seconds: float


def launch_env(**extra: str) -> dict[str, str]:
    """This environment plus ``extra``, with the launch scripts' PYTHON set to this interpreter."""
    return {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **extra}


@dataclass
class Started:
    """A process tree started by ``start``, its output file and its start time."""

    proc: subprocess.Popen
    output: IO[str]
    t0: float


def start(cmd: list[str], env: dict[str, str]) -> Started:
    """Start ``cmd`` in the repository root, in a session of its own, output to a temporary file
    (not a pipe: a full pipe would stall one node of a job while the test waits on another)."""
    output = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    return Started(proc, output, time.monotonic())


def finish(started: list[Started], timeout_s: float) -> list[Result]:
    """Wait for every started process; past ``timeout_s`` kill all their process groups and fail."""
    deadline = time.monotonic() + timeout_s
    seconds = []
    try:
        for s in started:
            s.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            seconds.append(time.monotonic() - s.t0)
    except subprocess.TimeoutExpired:
        for s in started:
            if s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
        raise AssertionError(f"{[s.proc.args for s in started]} did not finish within {timeout_s}s") from None
    results = []
    for s, secs in zip(started, seconds, strict=True):
        s.output.seek(0)
        results.append(Result(s.proc.returncode, s.output.read(), secs))
        s.output.close()
    return results


def run(cmd: list[str], env: dict[str, str], timeout_s: float) -> Result:
    """Run one command to completion (see ``finish``)."""
    return finish([start(cmd, env)], timeout_s)[0]


def verified(json_path: Path, world_size: int, nnodes: int) -> dict[str, Any]:
    """The job's summary, after checking it verified and ran on the expected world."""
    summary = json.loads(json_path.read_text())
    assert summary["verify"]["ok"], summary["verify"]
    assert (summary["world_size"], summary["nnodes"]) == (world_size, nnodes)
    return summary


def failed_at_start(job: Result, line: str, ranks: int) -> None:
    """``job`` failed, each of its ``ranks`` ranks printing ``line`` once, long before a rendezvous timeout."""
    assert job.returncode != 0, job.output
    assert job.output.count(line) == ranks, job.output
    assert job.seconds < 60, f"a mismatch must fail at once, not at the rendezvous timeout ({job.seconds:.0f} s)"
