"""launch/slurm/ against a real Slurm: one slurmctld and two slurmd (nodes n1, n2) on this machine.

The cluster (tests/launch/slurm_cluster.sh) is private to this module: its own munge key and socket,
config, ports and spool, started once and stopped when the module's tests are done. The tests skip
only where Slurm is not installed and cannot be.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from epruntime.parallel.launcher import free_port
from tests.launch.jobs import CPU_SIM, ROOT, SHORT, TWO_BY_TWO, failed_at_start, launch_env, run, verified

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tests" / "launch" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a client of the two-node cluster (SLURM_CONF set)."""
    install = subprocess.run([CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if install.returncode == 3:
        pytest.skip(install.stderr.strip().splitlines()[-1])
    assert install.returncode == 0, install.stderr
    state = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run([CLUSTER, "start", state], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        yield launch_env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run([CLUSTER, "stop", state], timeout=60, check=True)


def test_sbatch_cpu_sim_runs_to_a_verified_result(slurm: dict[str, str], tmp_path: Path) -> None:
    out, logs = tmp_path / "result.json", tmp_path / "logs"
    job = run(
        [
            "sbatch", "--wait", f"--output={tmp_path}/%x-%j.out", "launch/slurm/cpu-sim.sbatch",
            *SHORT, "--verify", "--json", str(out),
        ],
        {**slurm, "LOG_DIR": str(logs), "RDZV_PORT": str(free_port())},
        timeout_s=300,
    )  # fmt: skip
    batch_log = "\n".join(p.read_text() for p in tmp_path.glob("epruntime-cpu-sim-*.out"))
    assert job.returncode == 0, job.output + batch_log
    verified(out, world_size=8, nnodes=2)  # the script's own 2 nodes x 4, from configs/cpu-sim.yaml
    assert "rendezvous on n1 (" in batch_log  # head node: the first of `scontrol show hostnames`
    node_logs = [(logs / f"node-{n}.log").read_text() for n in range(2)]  # srun --output=...-%n.log
    assert all("launcher torchrun" in log for log in node_logs)
    assert "[epruntime] launcher torchrun: 8 ranks on 2 node(s) x 4" in "".join(node_logs)


def srun(slurm: dict[str, str], args: list[str], port: int, timeout_s: float = 240):
    """``srun --nodes=2 --ntasks-per-node=2 python -m epruntime run ARGS``: ranks straight from Slurm,
    rendezvous on ``port`` (MASTER_PORT: the port derived from the job id is left to the unit tests)."""
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", slurm["PYTHON"], "-m", "epruntime"]
    env = {**slurm, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    return run([*cmd, "run", "--config", str(CPU_SIM), *args], env, timeout_s)


def test_srun_without_torchrun_runs_to_a_verified_result(slurm: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    port = free_port()
    job = srun(slurm, [*TWO_BY_TWO, *SHORT, "--verify", "--json", str(out)], port)
    assert job.returncode == 0, job.output
    verified(out, world_size=4, nnodes=2)
    # n1 does not resolve here: the head node falls back to SLURM_LAUNCH_NODE_IPADDR
    assert f"[epruntime] launcher srun: 4 ranks on 2 node(s) x 2, rendezvous tcp://127.0.0.1:{port}" in job.output


def test_yaml_that_disagrees_with_srun_fails_on_every_rank(slurm: dict[str, str]) -> None:
    one_node = ["--set", "topology.nnodes=1", "--set", "topology.ranks_per_node=4"]
    job = srun(slurm, [*one_node, *SHORT], free_port(), timeout_s=120)
    line = "epruntime: error: topology.ranks_per_node: the launcher runs 2 ranks per node but the config says 4"
    failed_at_start(job, line, ranks=4)
