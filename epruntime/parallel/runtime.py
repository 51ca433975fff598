"""Process groups from the launcher's environment: ``init_runtime(cfg) -> Runtime``.

Finds the launcher (torchrun, mpirun, srun or none: see ``bootstrap``), checks its world against the
YAML topology before any collective, starts torch.distributed with the configured timeout and builds
the world, intra-node and rail groups. With no launcher it runs a 1-rank world.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from epruntime.config.checks import check_environment
from epruntime.config.schema import Config, ConfigError, config_to_dict
from epruntime.parallel import health
from epruntime.parallel.cpu_alloc import keep_buffers_in_heap
from epruntime.parallel.cpu_sched import batch_scheduling_if_oversubscribed, cores_available
from epruntime.parallel.launcher import LaunchEnv as LaunchEnv  # re-exported: callers check worlds with it
from epruntime.parallel.launcher import detect_launcher, reconcile_topology
from epruntime.parallel.layout import ParallelLayout, build_layout
from epruntime.parallel.placement import placement_rows
from epruntime.parallel.topology import Topology


@dataclass
class Runtime:
    """This rank's place in the job: the config it runs, its parallel layout (every process group, built
    once) and its device. ``rank`` is always the process rank; the EP rank is ``layout.ep.rank``."""

    cfg: Config
    layout: ParallelLayout
    device: torch.device
    launcher: str
    local_rank: int = 0

    @property
    def topo(self) -> Topology:
        return self.layout.topo

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.layout.world

    @property
    def intra_group(self) -> dist.ProcessGroup:
        return self.layout.intra

    @property
    def rail_group(self) -> dist.ProcessGroup:
        return self.layout.rail

    def log(self, message: str) -> None:
        """A per-rank line, prefixed with the rank."""
        print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)

    def log0(self, message: str) -> None:
        """A line from rank 0 only."""
        if self.rank == 0:
            print(message, flush=True)


def process_group_backend(backend: str) -> str:
    """torch.distributed's backend string for ``topology.backend``: with ``nccl``, NCCL moves CUDA tensors
    and gloo the small host-side collectives of the same groups (count exchanges, timing and traffic
    reductions, config agreement), which NCCL alone would refuse."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _fingerprint(section: dict) -> int:
    digest = hashlib.sha256(json.dumps(section, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def check_ranks_agree(cfg: Config, world_size: int, placement: list[list[int]] | None = None) -> None:
    """Every rank must run the same config (and the same expert placement: the file's content, not only its
    path): one all-gather of a fingerprint per section, before any layer."""
    sections: dict[str, Any] = {**config_to_dict(cfg), "runtime.placement": {"phy2log": placement or []}}
    mine = torch.tensor([_fingerprint(body) for body in sections.values()], dtype=torch.int64)  # [S]
    every = torch.zeros(world_size * len(mine), dtype=torch.int64)  # [W * S]
    health.all_gather_flat(every, mine)
    every = every.view(world_size, len(mine))  # [W, S]
    for i, name in enumerate(sections):
        differ = (every[:, i] != every[0, i]).nonzero().flatten().tolist()
        if differ:
            raise ConfigError(
                f"{name}: rank(s) {differ} run a different {name} section than rank 0; "
                f"start every rank with the same YAML and --set overrides"
            )


def init_runtime(cfg: Config) -> Runtime:
    """Start torch.distributed from the launcher's environment and build the parallel layout (every group, once)."""
    check_environment(cfg)
    env = detect_launcher()
    if env.rank == 0:
        print(f"[epruntime] {env.describe()}", file=sys.stderr, flush=True)
    cfg = reconcile_topology(cfg, env)
    slots = cfg.model.n_routed_experts + cfg.runtime.redundant_experts  # physical expert slots
    topo = Topology(cfg.topology.nnodes, cfg.topology.ranks_per_node, slots)
    timeout = timedelta(seconds=cfg.runtime.timeout_s)
    if cfg.topology.device == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
        keep_buffers_in_heap()
        if batch_scheduling_if_oversubscribed(env.local_world_size) and env.local_rank == 0:
            print(
                f"[epruntime] {env.local_world_size} ranks share {cores_available()} cores here: "
                f"SCHED_BATCH (computing ranks are not preempted on every wake-up)",
                file=sys.stderr,
                flush=True,
            )
    if not dist.is_initialized():
        backend = process_group_backend(cfg.topology.backend)
        if env.launcher == "none":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(
                backend,
                init_method=env.init_method,
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                **kwargs,
            )
    rank = dist.get_rank()
    health.WATCHDOG.start(rank, topo.world_size, cfg.runtime.timeout_s)
    with health.stage("start-up: config agreement"):
        check_ranks_agree(cfg, topo.world_size, placement_rows(cfg))
    if cfg.runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    layout = build_layout(
        topo,
        cfg.runtime.moe_tp,
        rank,
        device,
        timeout,
        placement_rows=placement_rows(cfg),
        num_logical=cfg.model.n_routed_experts,
    )
    health.WATCHDOG.current = "idle"
    return Runtime(cfg=cfg, layout=layout, device=device, launcher=env.launcher, local_rank=env.local_rank)


def sub_runtime(rt: Runtime, group: dist.ProcessGroup) -> Runtime:
    """A one-rank world of this rank alone over ``group`` (a group that holds only this rank), with every
    expert local: what the benchmark's one-rank baseline runs in. Nothing of ``rt``'s layout is reused."""
    cfg = rt.cfg.replace(
        topology=dataclasses.replace(rt.cfg.topology, nnodes=1, ranks_per_node=1),
        runtime=dataclasses.replace(
            rt.cfg.runtime, moe_tp=1, shared_expert_tp=1, redundant_experts=0, placement="contiguous", rebalance_every=0
        ),
    )
    topo = Topology(1, 1, cfg.model.n_routed_experts)
    layout = build_layout(topo, 1, 0, rt.device, timedelta(seconds=cfg.runtime.timeout_s), world=group)
    return Runtime(cfg=cfg, layout=layout, device=rt.device, launcher=rt.launcher, local_rank=rt.local_rank)


def shutdown_runtime() -> None:
    """Tear down torch.distributed if it was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_rank(rt: Runtime) -> None:
    """Leave the job together: wait for every rank, release what the EP world's backends hold (DeepEP's
    buffers: a teardown all ranks make together, which an error path must not attempt), then tear
    torch.distributed down."""
    if dist.is_initialized():
        dist.barrier()
    rt.layout.ep.release_resources()
    shutdown_runtime()
