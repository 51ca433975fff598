"""launch/torchrun.sh for real: two torchrun agents on this machine form a 2-node job (c10d rendezvous)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from epruntime.parallel.launcher import free_port
from tests.launch.jobs import ROOT, SHORT, TWO_BY_TWO, Result, failed_at_start, finish, launch_env, start, verified

pytestmark = pytest.mark.slow


def two_agents(args: list[str], timeout_s: float = 240) -> list[Result]:
    """``launch/torchrun.sh ARGS`` as two nodes of two ranks each; both agents' results."""
    env = launch_env(
        NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID=uuid.uuid4().hex[:8]
    )
    return finish([start([str(ROOT / "launch" / "torchrun.sh"), *args], env) for _ in range(2)], timeout_s)


def test_two_node_torchrun_runs_to_a_verified_result(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    agents = two_agents([*TWO_BY_TWO, *SHORT, "--verify", "--json", str(out)])
    assert [a.returncode for a in agents] == [0, 0], "\n".join(a.output for a in agents)
    summary = verified(out, world_size=4, nnodes=2)
    assert summary["ranks_per_node"] == 2
    logs = "".join(a.output for a in agents)
    assert "[epruntime] launcher torchrun: 4 ranks on 2 node(s) x 2" in logs  # GROUP_WORLD_SIZE, LOCAL_WORLD_SIZE
    assert all(f"[rank {r}] node {r // 2} local {r % 2}" in logs for r in range(4))


def test_yaml_that_disagrees_with_torchrun_fails_on_every_rank(tmp_path: Path) -> None:
    one_node = ["--set", "topology.nnodes=1", "--set", "topology.ranks_per_node=4"]  # 4 ranks, but 2 nodes x 2
    agents = two_agents([*one_node, *SHORT], timeout_s=120)
    line = (
        "epruntime: error: topology.ranks_per_node: the launcher runs 2 ranks per node but the config says 4 "
        "(torchrun on 2 nodes); make them equal"
    )
    for agent in agents:
        failed_at_start(agent, line, ranks=2)  # each of the agent's two ranks, one line each
