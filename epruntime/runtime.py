"""Process groups from the launcher's environment: ``init_runtime(cfg) -> Runtime``.

Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT),
checks them against the YAML topology before any collective, starts torch.distributed with the
configured timeout and builds the world, intra-node and rail groups. With no launcher it runs a
1-rank world.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import Config, ConfigError, check_environment
from .topology import Topology


@dataclass
class Runtime:
    """This rank's place in the job and the process groups the dispatchers use."""

    cfg: Config
    topo: Topology
    rank: int
    local_rank: int
    device: torch.device
    launcher: str
    world_group: dist.ProcessGroup
    intra_group: dist.ProcessGroup
    rail_group: dist.ProcessGroup

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    @property
    def node(self) -> int:
        return self.topo.node_of(self.rank)

    @property
    def local_index(self) -> int:
        return self.topo.local_index_of(self.rank)

    def log(self, message: str) -> None:
        """A per-rank line, prefixed with the rank."""
        print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)

    def log0(self, message: str) -> None:
        """A line from rank 0 only."""
        if self.rank == 0:
            print(message, flush=True)


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process about its place in the job."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r}: expected an integer; check the launcher") from None


def detect_launcher() -> LaunchEnv:
    """Read the launcher's environment; a process with no RANK/WORLD_SIZE is a 1-rank world."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = _env_int("WORLD_SIZE")
        return LaunchEnv(
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env",
            rank=_env_int("RANK"),
            world_size=world,
            local_rank=_env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0,
            local_world_size=_env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world,
        )
    return LaunchEnv(launcher="none", rank=0, world_size=1, local_rank=0, local_world_size=1)


def reconcile_topology(cfg: Config, env: LaunchEnv) -> Config:
    """Check the launcher's world against the YAML; one clear line when they disagree."""
    topo = cfg.topology
    if env.launcher == "none":
        if topo.world_size != 1:
            print(
                f"[epruntime] no launcher found (RANK/WORLD_SIZE unset): running a 1-rank world instead of "
                f"topology {topo.nnodes}x{topo.ranks_per_node}",
                file=sys.stderr,
            )
        return cfg.replace(topology=dataclasses.replace(topo, nnodes=1, ranks_per_node=1))
    if env.world_size != topo.world_size:
        raise ConfigError(
            f"topology: the launcher started {env.world_size} ranks but the config asks for "
            f"nnodes={topo.nnodes} x ranks_per_node={topo.ranks_per_node} = {topo.world_size}; "
            f"launch {topo.world_size} ranks or fix the topology"
        )
    simulated = env.local_world_size == env.world_size  # every rank on one machine: nodes may be simulated
    if not simulated and env.local_world_size != topo.ranks_per_node:
        raise ConfigError(
            f"topology.ranks_per_node: the launcher runs {env.local_world_size} ranks per node "
            f"(LOCAL_WORLD_SIZE) but the config says {topo.ranks_per_node}; make them equal"
        )
    return cfg


def _new_groups(rank_lists: list[list[int]], mine: list[int], timeout: timedelta) -> dist.ProcessGroup:
    """Create one group per rank list (every rank must create all of them) and return this rank's."""
    own = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=timeout)
        if ranks == mine:
            own = group
    assert own is not None
    return own


def init_runtime(cfg: Config) -> Runtime:
    """Start torch.distributed from the launcher's environment and build the EP process groups."""
    check_environment(cfg)
    env = detect_launcher()
    cfg = reconcile_topology(cfg, env)
    topo = Topology(cfg.topology.nnodes, cfg.topology.ranks_per_node, cfg.model.n_routed_experts)
    timeout = timedelta(seconds=cfg.runtime.timeout_s)
    if cfg.topology.device == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if env.launcher == "none":
            dist.init_process_group(
                cfg.topology.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(
                cfg.topology.backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
            )
    rank = dist.get_rank()
    intra = _new_groups(
        [topo.node_ranks(n) for n in range(topo.nnodes)], topo.node_ranks(topo.node_of(rank)), timeout
    )
    rail = _new_groups(
        [topo.rail_ranks(i) for i in range(topo.ranks_per_node)],
        topo.rail_ranks(topo.local_index_of(rank)),
        timeout,
    )
    return Runtime(
        cfg=cfg,
        topo=topo,
        rank=rank,
        local_rank=env.local_rank,
        device=device,
        launcher=env.launcher,
        world_group=dist.group.WORLD,
        intra_group=intra,
        rail_group=rail,
    )


def shutdown_runtime() -> None:
    """Tear down torch.distributed if it was started."""
    if dist.is_initialized():
        dist.destroy_process_group()
