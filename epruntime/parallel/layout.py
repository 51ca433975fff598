"""The one parallel layout of a job, built once by ``init_runtime``: every process group and the EP view.

Groups, for ``nnodes x ranks_per_node`` ranks and ``runtime.moe_tp = N``:

- ``world``: every rank; ``intra``: the ranks of one node; ``rail``: the ranks with one local index on
  every node.
- ``tp``: ranks ``[g*N, (g+1)*N)`` of one node (expert TP group ``g``); they share their tokens and rank
  ``r`` holds slice ``r % N`` of the intermediate dimension of every expert the group owns.
- ``ep``: the expert-parallel sub-world of the ranks with one TP index (``nnodes x ranks_per_node / N``
  ranks, EP rank ``r // N``), with its own intra-node and rail groups. With ``N = 1`` it is the job's
  world itself. Dispatchers see only this :class:`EPView`; its ``rank`` is always the EP rank.

Every rank creates every group, in one fixed order (``torch.distributed.new_group`` is collective).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from epruntime.parallel.placement import ExpertPlacement
from epruntime.parallel.topology import Topology


@dataclass(frozen=True)
class EPView:
    """The expert-parallel world a dispatcher works in: its topology, this rank's EP rank and its groups."""

    topo: Topology  # the EP world: nnodes x (ranks_per_node / moe_tp) ranks and the routed experts
    rank: int  # this process's rank in the EP world
    world: dist.ProcessGroup
    intra: dist.ProcessGroup
    rail: dist.ProcessGroup
    device: torch.device
    # what the backends of this EP world share across layers, e.g. DeepEP's one buffer ("deepep"); each value
    # has a collective release(), which end_rank calls on every rank together
    resources: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    def release_resources(self) -> None:
        """Release what the backends keep here (collective: every rank of the EP world, at the same point)."""
        for resource in self.resources.values():
            resource.release()
        self.resources.clear()

    @property
    def node(self) -> int:
        return self.topo.node_of(self.rank)

    @property
    def local_index(self) -> int:
        return self.topo.local_index_of(self.rank)


@dataclass(frozen=True)
class TPGroup:
    """This rank's expert-TP group (``None`` when ``moe_tp`` is 1) and its index in it."""

    group: dist.ProcessGroup | None
    rank: int
    size: int


@dataclass(frozen=True)
class ParallelLayout:
    """The job's topology, this process's rank, and every named group (see the module docstring)."""

    topo: Topology
    rank: int
    world: dist.ProcessGroup
    intra: dist.ProcessGroup
    rail: dist.ProcessGroup
    tp: TPGroup
    ep: EPView
    placements: tuple[ExpertPlacement, ...]  # one per MoE layer in model order, or one for every layer

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    def placement(self, moe_layer: int = 0) -> ExpertPlacement:
        """The expert slots of MoE layer ``moe_layer`` (in model order; a standalone layer is 0)."""
        return self.placements[moe_layer if len(self.placements) > 1 else 0]

    def describe(self) -> str:
        """One line for the log: this rank's node, local index, TP slice and EP experts."""
        tp = f", TP slice {self.tp.rank}/{self.tp.size}" if self.tp.size > 1 else ""
        experts = self.ep.topo.expert_range(self.ep.rank)
        return (
            f"node {self.topo.node_of(self.rank)} local {self.topo.local_index_of(self.rank)}{tp}, "
            f"EP rank {self.ep.rank}/{self.ep.world_size}, experts {experts.start}-{experts.stop - 1}"
        )


def new_groups(rank_lists: list[list[int]], rank: int, timeout: timedelta) -> dist.ProcessGroup:
    """Create one group per rank list (every rank must create all of them) and return ``rank``'s."""
    own = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            own = group
    if own is None:
        raise ValueError(f"new_groups: rank {rank} is in none of {rank_lists}")
    return own


def _check_sizes(topo: Topology, moe_tp: int, world: dist.ProcessGroup) -> None:
    size = dist.get_world_size(world)
    if size != topo.world_size:
        raise ValueError(f"parallel layout: the process group has {size} ranks, the topology {topo.world_size}")
    if topo.ranks_per_node % moe_tp or topo.num_experts % (topo.world_size // moe_tp):
        raise ValueError(
            f"parallel layout: moe_tp={moe_tp} must divide ranks_per_node={topo.ranks_per_node}, and the EP world "
            f"{topo.world_size // moe_tp} ranks must divide {topo.num_experts} experts"
        )


def build_layout(
    topo: Topology,
    moe_tp: int,
    rank: int,
    device: torch.device,
    timeout: timedelta,
    world: dist.ProcessGroup | None = None,
    placement_rows: list[list[int]] | None = None,
    num_logical: int | None = None,
) -> ParallelLayout:
    """Create every group of ``topo`` over ``world`` (default: the whole job) and return this rank's layout.

    ``topo.num_experts`` counts the physical expert slots; ``placement_rows`` (``phy2log`` rows, see
    :mod:`epruntime.parallel.placement`) say which of the ``num_logical`` logical experts each holds
    (default: the identity, one expert per slot). A one-rank world needs no new group: every group is
    ``world`` itself, so a rank can build a layout of its own over a group that holds only itself.
    """
    world = dist.group.WORLD if world is None else world
    _check_sizes(topo, moe_tp, world)
    ep_topo = Topology(topo.nnodes, topo.ranks_per_node // moe_tp, topo.num_experts)
    rows = placement_rows or [list(range(topo.num_experts))]
    logical = topo.num_experts if num_logical is None else num_logical
    placements = tuple(
        ExpertPlacement.from_row(row, logical, ep_topo.world_size, ep_topo.ranks_per_node) for row in rows
    )
    if topo.world_size == 1:
        ep = EPView(topo, 0, world, world, world, device)
        return ParallelLayout(topo, 0, world, world, world, TPGroup(None, 0, 1), ep, placements)
    rpn, nodes = topo.ranks_per_node, topo.nnodes
    intra = new_groups([topo.node_ranks(n) for n in range(nodes)], rank, timeout)
    rail = new_groups([topo.rail_ranks(i) for i in range(rpn)], rank, timeout)
    if moe_tp == 1:
        ep = EPView(topo, rank, world, intra, rail, device)
        return ParallelLayout(topo, rank, world, intra, rail, TPGroup(None, 0, 1), ep, placements)
    span = rpn // moe_tp  # EP ranks per node in the sub-world
    groups = topo.world_size // moe_tp
    tp_group = new_groups([list(range(g * moe_tp, (g + 1) * moe_tp)) for g in range(groups)], rank, timeout)
    ep_world = new_groups([list(range(i, topo.world_size, moe_tp)) for i in range(moe_tp)], rank, timeout)
    ep_intra = new_groups(
        [[n * rpn + i + k * moe_tp for k in range(span)] for n in range(nodes) for i in range(moe_tp)], rank, timeout
    )
    ep_rail = new_groups(
        [[n * rpn + j * moe_tp + i for n in range(nodes)] for j in range(span) for i in range(moe_tp)], rank, timeout
    )
    ep = EPView(ep_topo, rank // moe_tp, ep_world, ep_intra, ep_rail, device)
    return ParallelLayout(topo, rank, world, intra, rail, TPGroup(tp_group, rank % moe_tp, moe_tp), ep, placements)
