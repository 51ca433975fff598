"""Which launcher started this process and where its rendezvous is: ``detect_launcher() -> LaunchEnv``.

Launchers, in the order they are recognised:

- **torchrun** (or anything following its ``env://`` contract): RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, GROUP_RANK / GROUP_WORLD_SIZE (node index / node count), MASTER_ADDR/PORT.
- **mpirun**: Open MPI (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE) or MPICH/Hydra (PMI_RANK,
  PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS). The node layout comes from MPI itself (an allgather of
  host names) and rank 0's rendezvous address and port are broadcast with mpi4py. These variables
  are checked before Slurm's because an ``mpirun`` inside a Slurm allocation inherits SLURM_* ones.
- **srun** without torchrun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID,
  SLURM_STEP_NUM_NODES, SLURM_STEP_TASKS_PER_NODE (srun sets the STEP ones; a batch script has
  none). The head node is MASTER_ADDR, else the first host of SLURM_STEP_NODELIST, else (when that
  name does not resolve) SLURM_LAUNCH_NODE_IPADDR; the port is MASTER_PORT, else one derived from
  the job and step ids so every task computes the same.
- **none**: a 1-rank world.

``reconcile_topology`` then checks the launcher's world against the YAML with one clear line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from epruntime.config.schema import Config, ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process about its place in the job."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    nnodes: int | None = None  # nodes the launcher spans; None: world_size // local_world_size
    node_rank: int | None = None  # this process's node as the launcher numbers them, when it says
    rank_nodes: tuple[int, ...] | None = None  # every rank's node, when the launcher tells all (MPI)
    master_addr: str | None = None  # rendezvous for tcp:// init; None: torchrun's env:// variables
    master_port: int | None = None

    @property
    def num_nodes(self) -> int:
        return self.nnodes if self.nnodes is not None else self.world_size // self.local_world_size

    @property
    def init_method(self) -> str:
        """The ``init_process_group`` URL: ``env://`` under torchrun, ``tcp://head:port`` otherwise."""
        return "env://" if self.master_addr is None else f"tcp://{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        """One line for the log: launcher, world layout and rendezvous."""
        if self.launcher == "none":
            return "launcher none: a 1-rank world"
        return (
            f"launcher {self.launcher}: {self.world_size} ranks on {self.num_nodes} node(s) x "
            f"{self.local_world_size}, rendezvous {self.init_method}"
        )


# world-size variables of torchrun, Open MPI, MPICH and Slurm
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched_with_peers(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher started this process as one of several ranks (read from the environment only)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name, "1").strip() not in ("", "0", "1") for name in WORLD_SIZE_VARIABLES)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r}: expected an integer; check the launcher") from None


def _from_torchrun(environ: Mapping[str, str]) -> LaunchEnv | None:
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    world = _int(environ, "WORLD_SIZE")
    has = environ.__contains__
    return LaunchEnv(
        launcher="torchrun" if has("TORCHELASTIC_RUN_ID") else "env",
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK") if has("LOCAL_RANK") else 0,
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE") if has("LOCAL_WORLD_SIZE") else world,
        nnodes=_int(environ, "GROUP_WORLD_SIZE") if has("GROUP_WORLD_SIZE") else None,
        node_rank=_int(environ, "GROUP_RANK") if has("GROUP_RANK") else None,
    )


# (rank, size, local rank, local size) variables of each MPI launcher
_MPI_VARIABLES = {
    "Open MPI": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "MPICH": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def mpi_exchange(environ: Mapping[str, str]) -> tuple[list[str], str, int]:
    """Over MPI: every rank's host name, and the rendezvous (address, port) chosen by rank 0."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            "mpirun started this process but mpi4py is not installed; pip install 'epruntime[mpi]' "
            "(or an mpi4py built against this MPI)"
        ) from None
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    chosen = None
    if comm.Get_rank() == 0:
        addr = environ.get("MASTER_ADDR") or socket.gethostname()
        chosen = (addr, _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port(""))
    addr, port = comm.bcast(chosen, root=0)
    return hosts, addr, port


def _from_mpi(environ: Mapping[str, str]) -> LaunchEnv | None:
    for flavour, names in _MPI_VARIABLES.items():
        if all(name in environ for name in names):
            rank, world, local_rank, local_world = (_int(environ, name) for name in names)
            hosts, addr, port = mpi_exchange(environ)
            if len(hosts) != world:
                raise ConfigError(
                    f"{flavour}: {names[1]}={world} but MPI_COMM_WORLD has {len(hosts)} ranks; "
                    "mpi4py must be built against the MPI that runs mpirun"
                )
            nodes = list(dict.fromkeys(hosts))  # host names in order of their first rank
            rank_nodes = tuple(nodes.index(host) for host in hosts)
            return LaunchEnv(
                "mpirun",
                rank,
                world,
                local_rank,
                local_world,
                nnodes=len(nodes),
                node_rank=rank_nodes[rank],
                rank_nodes=rank_nodes,
                master_addr=addr,
                master_port=port,
            )
    return None


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node notation: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ConfigError(f"environment SLURM_STEP_TASKS_PER_NODE={spec!r}: not Slurm's N(xM),... notation")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``"gpu[007-010,12],cpu1"`` -> ``"gpu007"``."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)
    if first is None:
        raise ConfigError(f"Slurm node list {nodelist!r} is empty; set MASTER_ADDR")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first.group(0))


def _slurm_head(environ: Mapping[str, str]) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    head = first_host(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    try:
        socket.getaddrinfo(head, None)
        return head
    except OSError:
        if "SLURM_LAUNCH_NODE_IPADDR" in environ:
            return environ["SLURM_LAUNCH_NODE_IPADDR"]
        raise ConfigError(f"srun: head node {head!r} does not resolve; set MASTER_ADDR") from None


def _from_srun(environ: Mapping[str, str]) -> LaunchEnv | None:
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    counts = tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
    if len(set(counts)) != 1:
        raise ConfigError(
            f"srun: uneven tasks per node (SLURM_STEP_TASKS_PER_NODE={environ['SLURM_STEP_TASKS_PER_NODE']}); "
            "start the same number on every node (srun --ntasks-per-node=N)"
        )
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    else:  # the same on every task of this step, and different for the next step
        port = 20000 + (_int(environ, "SLURM_JOB_ID") * 31 + _int(environ, "SLURM_STEP_ID")) % 20000
    return LaunchEnv(
        launcher="srun",
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, "SLURM_STEP_NUM_TASKS"),
        local_rank=_int(environ, "SLURM_LOCALID"),
        local_world_size=counts[0],
        nnodes=_int(environ, "SLURM_STEP_NUM_NODES"),
        node_rank=_int(environ, "SLURM_NODEID"),
        master_addr=_slurm_head(environ),
        master_port=port,
    )


def detect_launcher(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Find the launcher (torchrun, mpirun, srun, none) from the environment; none is a 1-rank world."""
    environ = os.environ if environ is None else environ
    for reader in (_from_torchrun, _from_mpi, _from_srun):
        env = reader(environ)
        if env is not None:
            return env
    return LaunchEnv(launcher="none", rank=0, world_size=1, local_rank=0, local_world_size=1)


def reconcile_topology(cfg: Config, env: LaunchEnv) -> Config:
    """Check the launcher's world against the YAML; one clear line when they disagree.

    With every rank on one machine the YAML's nodes may be simulated (any nnodes x ranks_per_node of
    the right world size); across real nodes, nodes, ranks per node and rank placement must match.
    """
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
    if env.num_nodes == 1:
        return cfg
    if env.local_world_size != topo.ranks_per_node:
        raise ConfigError(
            f"topology.ranks_per_node: the launcher runs {env.local_world_size} ranks per node but the config "
            f"says {topo.ranks_per_node} ({env.launcher} on {env.num_nodes} nodes); make them equal"
        )
    if env.num_nodes != topo.nnodes:
        raise ConfigError(
            f"topology.nnodes: the launcher ({env.launcher}) spans {env.num_nodes} nodes but the config says "
            f"{topo.nnodes}; launch on {topo.nnodes} nodes or fix the topology"
        )
    # where every rank's node is known (MPI), every rank finds the same misplaced one and fails alike
    known = enumerate(env.rank_nodes) if env.rank_nodes else [(env.rank, env.node_rank)]
    for rank, node in known:
        if node is not None and node != rank // topo.ranks_per_node:
            raise ConfigError(
                f"topology: rank {rank} runs on node {node} but the topology puts it on node "
                f"{rank // topo.ranks_per_node}; place ranks in blocks of {topo.ranks_per_node} per node "
                f"(srun --distribution=block, mpirun --map-by ppr:{topo.ranks_per_node}:node)"
            )
    return cfg
