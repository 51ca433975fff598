"""Expert tensor parallelism: TP groups inside a node, expert parallelism across them.

With ``runtime.moe_tp = N``, the ranks ``[g*N, (g+1)*N)`` of one node form TP group ``g`` and share
the same tokens. Rank ``r`` has TP index ``r % N``: it holds slice ``r % N`` of the intermediate
dimension of every expert its TP group owns. The ranks with one TP index form an EP sub-world of
``nnodes x ranks_per_node / N`` ranks, over which the usual dispatchers run unchanged; one
all-reduce over the TP group then sums the slices' partial outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from epruntime.parallel.runtime import Runtime, new_groups
from epruntime.parallel.topology import Topology


@dataclass
class ExpertParallel:
    """This rank's EP sub-world (``ep``, the runtime the dispatchers see) and its expert-TP group."""

    ep: Runtime
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int


def _build(rt: Runtime) -> ExpertParallel:
    tp = rt.cfg.runtime.moe_tp
    if tp == 1:
        return ExpertParallel(ep=rt, tp_group=None, tp_rank=0, tp_size=1)
    topo, me = rt.topo, rt.rank
    timeout = timedelta(seconds=rt.cfg.runtime.timeout_s)
    span = topo.ranks_per_node // tp  # EP ranks per node in the sub-world
    sub = Topology(topo.nnodes, span, topo.num_experts)
    tp_group = new_groups([list(range(g * tp, (g + 1) * tp)) for g in range(topo.world_size // tp)], me, timeout)
    ep_world = new_groups([list(range(i, topo.world_size, tp)) for i in range(tp)], me, timeout)
    rpn = topo.ranks_per_node
    intra = new_groups(
        [[n * rpn + i + k * tp for k in range(span)] for n in range(topo.nnodes) for i in range(tp)], me, timeout
    )
    rail = new_groups(
        [[n * rpn + j * tp + i for n in range(topo.nnodes)] for j in range(span) for i in range(tp)], me, timeout
    )
    ep = dataclasses.replace(
        rt, topo=sub, rank=me // tp, world_group=ep_world, intra_group=intra, rail_group=rail, expert_parallel=None
    )
    return ExpertParallel(ep=ep, tp_group=tp_group, tp_rank=me % tp, tp_size=tp)


def expert_parallel(rt: Runtime) -> ExpertParallel:
    """The EP/TP layout of ``rt`` (groups are created once, collectively, on first use)."""
    if rt.expert_parallel is None:
        rt.expert_parallel = _build(rt)
    return rt.expert_parallel


def tp_slice(weight: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Slice ``tp_rank`` of ``tp_size`` equal parts of ``weight`` along ``dim``."""
    return weight.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def tp_slice_gate_up(w13: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """``[..., 2I, H]`` (gate rows, then up rows) -> ``[..., 2I/N, H]`` with slice ``tp_rank`` of each half."""
    gate, up = w13.chunk(2, dim=-2)
    return torch.cat([tp_slice(gate, -2, tp_rank, tp_size), tp_slice(up, -2, tp_rank, tp_size)], dim=-2)
