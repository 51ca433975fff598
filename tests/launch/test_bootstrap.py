"""Launcher detection from each launcher's real variables, and every disagreement with the YAML."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from epruntime.config.schema import ConfigError, load_config
from epruntime.parallel import launcher
from epruntime.parallel.launcher import (
    LaunchEnv,
    detect_launcher,
    first_host,
    launched_with_peers,
    reconcile_topology,
    tasks_per_node,
)
from tests.launch.jobs import CPU_SIM

# What torchrun sets on the second of two nodes of 2 ranks each (local_elastic_agent.py).
TORCHRUN = {
    "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "job",
}  # fmt: skip
# What `srun --nodes=2 --ntasks-per-node=2` sets for task 2 (checked on this machine's Slurm).
SRUN = {
    "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "localhost,n2", "SLURM_JOB_NODELIST": "localhost,n2", "SLURM_JOB_ID": "7",
    "SLURM_STEP_ID": "0", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
}  # fmt: skip
OMPI = {
    "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}  # fmt: skip
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


@pytest.fixture
def two_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPI over two hosts, ranks 0-1 on host a, 2-3 on host b; rank 0 chose a:1234."""
    monkeypatch.setattr(launcher, "mpi_exchange", lambda environ: (["a", "a", "b", "b"], "a", 1234))


def sim_2x2():
    return load_config(CPU_SIM, ["topology.nnodes=2", "topology.ranks_per_node=2"])


# Rank 1 of OMPI or HYDRA under ``two_hosts``: node 0 of 2, rendezvous at rank 0's choice.
MPI_RANK_1 = LaunchEnv(
    "mpirun", 1, 4, 1, 2, nnodes=2, node_rank=0, rank_nodes=(0, 0, 1, 1), master_addr="a", master_port=1234
)
# Each launcher's variables for one rank of two nodes of 2 ranks each, the place they give it, and the
# start of its rendezvous URL; srun's port comes from the job id (test_srun_head_node_and_port).
LAUNCHED = {  # id: (variables, expected LaunchEnv, init_method prefix)
    "torchrun": (TORCHRUN, LaunchEnv("torchrun", 3, 4, 1, 2, nnodes=2, node_rank=1), "env://"),
    "srun": (SRUN, LaunchEnv("srun", 2, 4, 0, 2, nnodes=2, node_rank=1, master_addr="localhost"), "tcp://localhost:"),
    "openmpi": (OMPI, MPI_RANK_1, "tcp://a:1234"),
    "mpich": (HYDRA, MPI_RANK_1, "tcp://a:1234"),
}


@pytest.mark.usefixtures("two_hosts")
@pytest.mark.parametrize(("variables", "expected", "rendezvous"), LAUNCHED.values(), ids=LAUNCHED.keys())
def test_launcher_variables_place_the_rank(variables: dict[str, str], expected: LaunchEnv, rendezvous: str) -> None:
    env = detect_launcher(variables)
    topology = reconcile_topology(sim_2x2(), env).topology
    assert (topology.world_size, topology.nnodes, topology.ranks_per_node) == (4, 2, 2)
    line = f"launcher {expected.launcher}: 4 ranks on 2 node(s) x 2, rendezvous {rendezvous}"
    assert env.init_method.startswith(rendezvous) and env.describe().startswith(line), env.describe()
    if expected.launcher == "srun":  # every other field as expected
        env = dataclasses.replace(env, master_port=None)
    assert env == expected


def test_srun_head_node_and_port() -> None:
    derived = detect_launcher(SRUN).master_port
    assert 20000 <= derived < 40000
    assert derived == detect_launcher({**SRUN, "SLURM_PROCID": "0"}).master_port  # every task agrees
    unresolvable = {**SRUN, "SLURM_STEP_NODELIST": "no-such-node-x9[1-2]"}
    assert detect_launcher(unresolvable).master_addr == "127.0.0.1"  # SLURM_LAUNCH_NODE_IPADDR
    given = detect_launcher({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "29999"})
    assert given.init_method == "tcp://head:29999"
    with pytest.raises(ConfigError, match="uneven tasks per node"):
        detect_launcher({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3,1"})


def test_batch_script_and_bare_process_are_one_rank() -> None:
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}  # sbatch sets no STEP variables
    assert detect_launcher(batch).launcher == "none"
    assert detect_launcher({}) == LaunchEnv("none", 0, 1, 0, 1)
    assert reconcile_topology(load_config(CPU_SIM), detect_launcher({})).topology.world_size == 1


@pytest.mark.usefixtures("two_hosts")
def test_mpirun_inside_slurm_allocation_is_mpirun() -> None:
    assert detect_launcher({**SRUN, **OMPI}).launcher == "mpirun"
    assert detect_launcher({**SRUN, **OMPI, **TORCHRUN}).launcher == "torchrun"


def test_mpirun_round_robin_placement_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "mpi_exchange", lambda environ: (["a", "b", "a", "b"], "a", 1234))
    for rank in "0123":  # every rank fails alike, none is left waiting at the rendezvous
        with pytest.raises(ConfigError, match=r"rank 1 runs on node 1 but the topology puts it on node 0; .*ppr:2:"):
            reconcile_topology(sim_2x2(), detect_launcher({**OMPI, "OMPI_COMM_WORLD_RANK": rank}))


def test_mpirun_without_mpi4py_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ConfigError, match=r"mpi4py is not installed; pip install 'epruntime\[mpi\]'"):
        detect_launcher(OMPI)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (LaunchEnv("torchrun", 0, 8, 0, 4, nnodes=2), "launcher started 8 ranks but the config asks for nnodes=2"),
        (
            LaunchEnv("torchrun", 0, 4, 0, 1, nnodes=4),
            "topology.ranks_per_node: the launcher runs 1 ranks per node but the config says 2 (torchrun on 4 nodes)",
        ),
        (LaunchEnv("srun", 0, 4, 0, 2, nnodes=3), "topology.nnodes: the launcher (srun) spans 3 nodes but the config"),
        (LaunchEnv("srun", 2, 4, 0, 2, nnodes=2, node_rank=0), "rank 2 runs on node 0 but the topology puts it on"),
    ],
)
def test_disagreements_fail_with_one_line(env: LaunchEnv, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        reconcile_topology(sim_2x2(), env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_single_machine_may_simulate_nodes() -> None:
    cfg = load_config(CPU_SIM)  # 2 nodes x 4
    for env in (LaunchEnv("torchrun", 0, 8, 0, 8, nnodes=1), LaunchEnv("mpirun", 0, 8, 0, 8, nnodes=1)):
        assert reconcile_topology(cfg, env) is cfg
    alone = reconcile_topology(cfg, LaunchEnv("none", 0, 1, 0, 1))  # no launcher: a 1-rank world
    assert (alone.topology.nnodes, alone.topology.ranks_per_node) == (1, 1) and alone.model == cfg.model


def test_slurm_notations() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(ConfigError, match="notation"):
        tasks_per_node("2x3")
    assert first_host("gpu[007-010,12],cpu1") == "gpu007"
    assert first_host("rack[2-3]-n[05-06]") == "rack2-n05"
    assert first_host("head,n[1-4]") == "head"


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, False),
        ({"WORLD_SIZE": "1", "RANK": "0"}, False),
        ({"WORLD_SIZE": "4", "RANK": "2"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "8"}, True),
        ({"PMI_SIZE": "2"}, True),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "32"}, True),
    ],
)
def test_launched_with_peers_reads_every_launchers_world_size(environ: dict[str, str], expected: bool) -> None:
    assert launched_with_peers(environ) is expected
