"""``epruntime launch``: start every rank of the configured world on this machine, through torchrun's
own elastic agent (c10d rendezvous on 127.0.0.1), without a separate ``torchrun`` command."""

from __future__ import annotations

import os
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from epruntime.config.schema import Config
from epruntime.parallel.launcher import free_port


def launch_local(cfg: Config, command: list[str]) -> int:
    """Run ``epruntime COMMAND...`` (e.g. ``run --config ...``) on ``world_size`` local processes; return
    the job's exit status."""
    world = cfg.topology.world_size
    if world > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: ranks share the cores
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=f"epruntime-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"timeout": int(cfg.runtime.timeout_s)},
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(launch_config, sys.executable)("-m", "epruntime", *command)
    except ChildFailedError as exc:
        failures = exc.failures
        rank, first = min(failures.items(), key=lambda item: item[1].timestamp)
        print(
            f"epruntime launch: {len(failures)} of {world} ranks failed; first: rank {rank} "
            f"exited with status {first.exitcode}",
            file=sys.stderr,
        )
        return first.exitcode if first.exitcode > 0 else 1
    return 0
