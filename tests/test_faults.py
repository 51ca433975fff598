"""Faults on one rank end every rank within ``runtime.timeout_s``, each with a message naming the culprit.

The measured times to exit are printed (run with ``-s``) and written to ``out/faults.json``; the
README's fault table comes from them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from epruntime.parallel.health import SETTLE_S
from tests.distributed import _free_port
from tests.fault_worker import TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "out" / "faults.json"
# A dead or failing rank is noticed at once (closed socket): every rank is gone within runtime.timeout_s.
# A hung one is noticed at runtime.timeout_s; the others then wait up to SETTLE_S for reports, and rank 0,
# the store host, lingers SETTLE_S more; the hung rank's own watchdog fires at 1.5 x timeout_s.
HANG_EXIT_WITHIN_S = 1.5 * TIMEOUT_S + 2 * SETTLE_S + 2


def _run_job(mode: str, fault_rank: int, world: int = 4) -> tuple[list[int], list[str], float]:
    """Start ``world`` ranks; return exit codes, outputs, and the seconds from the fault to the last exit."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.fault_worker", mode, str(fault_rank)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while len(ended) < world and time.monotonic() < deadline:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.02)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0] for p in procs]
    fault = re.search(r"FAULT (\d+\.\d+)", outputs[fault_rank])
    assert fault, outputs[fault_rank]
    assert len(ended) == world, f"ranks still running after 120 s: {outputs}"
    return [p.returncode for p in procs], outputs, max(ended.values()) - float(fault.group(1))


def _record(fault: str, behaviour: str, seconds: float) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    table[fault] = {"behaviour": behaviour, "seconds_to_exit": round(seconds, 2)}
    RESULTS.write_text(json.dumps(table, indent=2))
    print(f"\n{fault}: every rank exited {seconds:.2f} s after the fault")


@dataclass(frozen=True)
class Fault:
    """One injected fault, what every rank must do about it, and its row of the README's fault table.

    Lines are templates: ``{rank}`` becomes the rank whose output is searched.
    """

    mode: str  # tests/fault_worker.py's MODE
    rank: int  # the faulty rank
    codes: tuple[int, ...]  # every rank's exit status
    culprit_lines: tuple[str, ...]  # in the faulty rank's output
    other_lines: tuple[str, ...]  # in every other rank's output
    within_s: float  # every rank has exited this long after the fault
    fault: str  # README row: the fault injected
    behaviour: str  # README row: what the job does


NAN_LINE = "layer 7 input: NaN/Inf on rank 0 (1 values) (runtime.check_finite)"
FAULTS = [
    Fault(
        mode="kill",
        rank=2,
        codes=(1, 1, -signal.SIGKILL, 1),
        culprit_lines=(),
        other_lines=("[rank {rank}] error: rank {rank}: layer 7 > ", "no word from rank(s) [2]: presumed dead"),
        within_s=TIMEOUT_S,
        fault="rank 2 killed (SIGKILL) mid-run",
        behaviour="others exit 1 naming rank 2 and their stage",
    ),
    Fault(
        mode="raise",
        rank=1,
        codes=(1, 1, 1, 1),
        culprit_lines=("TypeError in layer 7: EPMoE input: expected dtype torch.float32",),
        other_lines=("rank 1 failed: TypeError in layer 7",),
        within_s=TIMEOUT_S,
        fault="rank 1 raises (wrong dtype) mid-run",
        behaviour="all exit 1; the others quote rank 1's error",
    ),
    Fault(
        mode="hang",
        rank=3,
        codes=(1, 1, 1, 3),
        culprit_lines=("stuck in layer 7 > dispatch (simulated hang)",),
        other_lines=("no word from rank(s) [3]",),
        within_s=HANG_EXIT_WITHIN_S,
        fault="rank 3 hangs inside a stage",
        behaviour="others time out (runtime.timeout_s); its watchdog exits 3",
    ),
    Fault(
        mode="nan",
        rank=0,
        codes=(1, 1, 1, 1),
        culprit_lines=(NAN_LINE,),
        other_lines=(NAN_LINE,),  # every rank reports it alike
        within_s=TIMEOUT_S,
        fault="NaN in rank 0's input (check_finite on)",
        behaviour="all exit 1 naming rank 0 and the layer",
    ),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.mode for f in FAULTS])
def test_fault_ends_every_rank_naming_the_culprit(fault: Fault) -> None:
    codes, outs, seconds = _run_job(fault.mode, fault.rank)
    assert codes == list(fault.codes), outs
    for rank, out in enumerate(outs):
        for line in fault.culprit_lines if rank == fault.rank else fault.other_lines:
            assert line.format(rank=rank) in out, f"rank {rank}: {out}"
    assert seconds < fault.within_s
    _record(fault.fault, fault.behaviour, seconds)


@pytest.mark.parametrize("victim", [2])
def test_launch_returns_nonzero_when_a_rank_is_killed(tmp_path: Path, victim: int) -> None:
    """Through ``epruntime launch`` (torchrun's agent): the job ends and names the killed rank."""
    log = tmp_path / "launch.log"
    with log.open("w") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "epruntime", "launch", "--config", "configs/cpu-sim.yaml",
             "--set", "topology.nnodes=2", "--set", "topology.ranks_per_node=2",
             "--set", "runtime.iters=100000", "--set", "runtime.timeout_s=5"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        pid = None
        deadline = time.monotonic() + 120
        while pid is None and time.monotonic() < deadline:
            found = re.search(rf"\[rank {victim}\] .*pid (\d+)", log.read_text())
            pid = int(found.group(1)) if found else None
            time.sleep(0.1)
        assert pid, log.read_text()
        time.sleep(1.0)  # mid-run
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        code = launcher.wait(timeout=60)
        seconds = time.time() - killed
    text = log.read_text()
    assert code != 0
    assert f"first: rank {victim} exited with status -9" in text
    assert seconds < 5  # runtime.timeout_s of this job
    _record(f"rank {victim} killed under `epruntime launch`", "launcher stops the others, exits non-zero", seconds)
