"""Expert placement: which logical expert each physical slot holds, with redundant replicas for the hot experts.

``rebalance_experts`` has the interface of DeepSeek's EPLB (github.com/deepseek-ai/EPLB) and follows the same
policy, written here from its description: with the hierarchical policy (expert groups divide evenly over the
nodes) the groups are packed onto nodes, equal group counts per node, node loads as even as possible; inside each
node replicas are added one at a time to the expert with the highest load per replica; the node's replicas are then
packed onto its GPUs, equal counts per GPU, heaviest first onto the lightest GPU. The global policy is the same with
one group and one node.

That greedy placement is the first candidate; the others, all keeping the same constraints (equal counts per GPU, a
group's replicas on its node): a refinement pass swapping replicas between the heaviest GPU and the others while it
lowers that GPU's load; other replica counts (ties to the heavier expert, at most one replica per GPU of the node,
some replicas spent on the lightest experts as small fillers, then a local search moving one replica at a time);
and other packings of groups onto nodes. Each node (and each layer) keeps the candidate with the lowest heaviest
GPU, the greedy one on ties, so the result is never less balanced than the greedy placement.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from epruntime.eplb.metrics import gpu_loads
from epruntime.eplb.packing import bin_members, greedy_pack, refine_pack, replicate
from epruntime.eplb.search import CLOSE_ENOUGH, improve_counts, pack


def _positive_int(name: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; {fix}")
    return value


def _check_args(weight: object, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Validate ``rebalance_experts``'s arguments; return the loads as a CPU float64 ``[L, E]`` tensor."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a non-empty 2-D [layers, experts] tensor, got {shape}; pass one row per layer"
        )
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must be a real float or int tensor, got {weight.dtype}; pass token counts or loads")
    w = weight.detach().cpu().to(torch.float64).contiguous()  # [L, E]
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weight must be finite and >= 0; pass token counts or expected loads per expert")
    num_experts = w.shape[1]
    _positive_int("num_replicas", num_replicas, "pass the number of physical expert slots, experts + redundant")
    _positive_int("num_groups", num_groups, "pass the model's expert-group count (1 when it has no groups)")
    _positive_int("num_nodes", num_nodes, "pass the number of nodes (1 for a single node)")
    _positive_int("num_gpus", num_gpus, "pass the number of GPUs (EP ranks)")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) < experts ({num_experts}); use at least one slot per expert")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}); pad the slots")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes}); use equal nodes")
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the experts ({num_experts}); pass the model's groups")
    return w


def logical_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``phy2log [L, P]``, the physical slots of each expert: ``log2phy [L, E, maxcnt]`` (ascending, padded
    with -1) and ``logcnt [L, E]``."""
    num_layers, num_slots = phy2log.shape
    phy2log = phy2log.long()
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # [L, E]
    logcnt.scatter_add_(-1, phy2log, torch.ones_like(phy2log))
    maxcnt = max(int(logcnt.max()), 1)
    order = torch.sort(phy2log, dim=-1, stable=True).indices  # [L, P]: slots grouped by expert, ascending
    expert = phy2log.gather(-1, order)  # [L, P]
    start = logcnt.cumsum(-1) - logcnt  # [L, E]: first position of each expert in ``order``
    rank = torch.arange(num_slots).expand(num_layers, -1) - start.gather(-1, expert)  # [L, P]
    log2phy = torch.full((num_layers, num_experts * maxcnt), -1, dtype=torch.int64)  # [L, E * maxcnt]
    log2phy.scatter_(-1, expert * maxcnt + rank, order)
    return log2phy.view(num_layers, num_experts, maxcnt), logcnt


def _spare_counts(extra: int) -> list[int]:
    """How many of the ``extra`` replicas to hand to the lightest experts instead, in the variants tried."""
    ks = list(range(1, min(extra, 8) + 1))
    k = 12
    while k <= extra:
        ks.append(k)
        k = k * 3 // 2 if k % 4 == 0 else k * 4 // 3
    return ks


def _place_in_nodes(
    weight: torch.Tensor, node_of_group: torch.Tensor, num_slots: int, num_nodes: int, num_gpus: int, search: bool
) -> torch.Tensor:
    """``phy2log [L, P]`` for a given packing of groups onto nodes: replicate within each node, pack the node's
    replicas onto its GPUs, keeping per node the variant with the lowest heaviest GPU.

    The variants, first the plain greedy one (the described policy; ties keep the earlier variant): greedy packing;
    refined packing; ties between equal loads per replica going to the heavier expert; replicas per expert capped at
    the node's GPU count; some replicas handed to the lightest experts instead of the heaviest; then a local search
    moving replicas between experts (``search.improve_counts``). All but the first two run only on nodes not yet at
    the lower bound. The node's experts are listed group by group, heaviest group first, experts in id order; slots
    of a GPU are sorted by logical expert id.
    """
    num_layers, num_experts = weight.shape
    num_groups = node_of_group.shape[1]
    group_size = num_experts // num_groups
    gpus_per_node = num_gpus // num_nodes
    slots_per_node = num_slots // num_nodes
    group_w = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, groups]
    heavy_first = torch.sort(group_w, dim=-1, descending=True, stable=True).indices  # [L, groups]
    groups = heavy_first.gather(-1, torch.sort(node_of_group.gather(-1, heavy_first), dim=-1, stable=True).indices)
    groups = groups.view(num_layers, num_nodes, -1)  # [L, N, groups per node], heaviest group first
    node_experts = (groups.unsqueeze(-1) * group_size + torch.arange(group_size)).flatten(-2)  # [L, N, E/N]
    node_experts = node_experts.reshape(num_layers * num_nodes, -1)  # [L*N, E/N]
    node_w = weight.repeat_interleave(num_nodes, dim=0).gather(-1, node_experts)  # [L*N, E/N]

    slot2item, count = replicate(node_w, slots_per_node)  # [L*N, P/N], [L*N, E/N]
    slot_w = (node_w / count).gather(-1, slot2item)  # [L*N, P/N]
    # No placement beats the node's mean GPU load, nor the least possible largest replica (which this one has).
    bound = torch.maximum(node_w.sum(-1) / gpus_per_node, slot_w.max(-1).values)  # [L*N]
    gpu_of, peak = pack(slot_w, gpus_per_node, refine=False)
    extra = slots_per_node - node_w.shape[1]
    variants = [(0, -1, False), (0, -1, True)]  # (cap, hot, heavier_ties), the first one refined
    variants += [(gpus_per_node, -1, False)] if bool((count > gpus_per_node).any()) else []
    variants += [(0, extra - k, False) for k in _spare_counts(extra)]
    variants = variants if search else variants[:1]
    for k, (cap, hot, heavier) in enumerate(variants):
        open_rows = torch.ones_like(peak, dtype=torch.bool) if k == 0 else peak > bound * (1 + CLOSE_ENOUGH)  # [L*N]
        rows = open_rows.nonzero().squeeze(-1)  # [A]
        if rows.numel() == 0:
            break
        if k == 0:
            s2i, cnt = slot2item, count
        else:
            s2i, cnt = replicate(node_w[rows], slots_per_node, cap, hot, heavier)  # [A, P/N], [A, E/N]
        g, pk = pack((node_w[rows] / cnt).gather(-1, s2i), gpus_per_node, refine=True)
        better = pk < peak[rows] * (1 - 1e-12)  # [A]
        rows, s2i, g, pk = rows[better], s2i[better], g[better], pk[better]
        slot2item[rows], gpu_of[rows], peak[rows] = s2i, g, pk
    if search:
        rounds = min(2 * extra, 16)
        slot2item, gpu_of, peak = improve_counts(node_w, slot2item, gpu_of, peak, bound, gpus_per_node, rounds)
    expert = node_experts.gather(-1, slot2item)  # [L*N, P/N]: global logical id of each slot
    order = torch.sort(gpu_of * num_experts + expert, dim=-1, stable=True).indices  # [L*N, P/N]
    return expert.gather(-1, order).view(num_layers, num_slots)  # [L, P]


def _placements(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, search: bool
) -> list[torch.Tensor]:
    """Candidate ``phy2log [L, P]`` tensors, from the greedy packing of groups onto nodes first, then (for the layers
    where they differ from it) from a refined one and from the greedy one breaking ties between equal groups the
    other way."""
    num_layers = weight.shape[0]
    group_w = weight.view(num_layers, num_groups, -1).sum(-1)  # [L, groups]
    greedy_nodes = greedy_pack(group_w, num_nodes)  # [L, groups]
    out = [_place_in_nodes(weight, greedy_nodes, num_replicas, num_nodes, num_gpus, search)]
    if not search:
        return out
    tried = [bin_members(greedy_nodes, num_nodes)]  # [L, N, groups per node]
    for nodes in (refine_pack(group_w, greedy_nodes, num_nodes), greedy_pack(group_w, num_nodes, late_first=True)):
        members = bin_members(nodes, num_nodes)
        new = torch.stack([(members != t).flatten(1).any(-1) for t in tried]).all(0)  # [L]
        tried.append(members)
        if bool(new.any()):  # only the layers with a packing not tried yet are placed again
            rows = new.nonzero().squeeze(-1)
            cand = out[0].clone()
            cand[rows] = _place_in_nodes(weight[rows], nodes[rows], num_replicas, num_nodes, num_gpus, search)
            out.append(cand)
    return out


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, restoring the thread count after. The ops here are small and
    many; on a busy host, intra-op threads waiting on each other made them 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, search: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``E`` logical experts on ``num_replicas`` physical slots over ``num_gpus`` GPUs, balancing the load.

    ``weight [L, E]`` is the load of each logical expert per layer. Slot ``p`` lives on GPU ``p // (P / num_gpus)``;
    GPU ``g`` on node ``g // (num_gpus / num_nodes)``. The hierarchical policy (groups of ``E / num_groups``
    consecutive experts kept on one node) applies when ``num_groups % num_nodes == 0``, the global one otherwise.
    Returns ``phy2log [L, P]``, ``log2phy [L, E, maxcnt]`` (padded with -1) and ``logcnt [L, E]``, all int64 on CPU.
    Deterministic; it runs torch single-threaded for its duration (the thread count is restored). ``search=False``
    keeps only the plain greedy policy (one refined GPU packing per node, no other candidates): several times
    faster, for placing while serving.
    """
    w = _check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)  # [L, E]
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    with _one_thread():
        candidates = _placements(w, num_replicas, num_groups, num_nodes, num_gpus, search)
    peaks = []
    for phy2log in candidates:
        _, logcnt = logical_maps(phy2log, w.shape[1])
        peaks.append(gpu_loads(w, phy2log, logcnt, num_gpus).max(-1).values)  # [L]
    best = torch.stack(peaks).argmin(0)  # [L]: first of the lowest, so the greedy one wins ties
    phy2log = torch.stack(candidates)[best, torch.arange(w.shape[0])]  # [L, P]
    log2phy, logcnt = logical_maps(phy2log, w.shape[1])
    return phy2log, log2phy, logcnt


def contiguous_placement(num_layers: int, num_experts: int, num_replicas: int) -> torch.Tensor:
    """Today's layout without load balancing, ``phy2log [L, P]``: slot ``p`` holds expert ``p`` (needs ``P == E``)."""
    _positive_int("num_layers", num_layers, "pass the number of MoE layers")
    _positive_int("num_experts", num_experts, "pass the number of routed experts")
    _positive_int("num_replicas", num_replicas, "pass the number of physical expert slots")
    if num_replicas != num_experts:
        raise ValueError(
            f"contiguous_placement needs num_replicas == num_experts ({num_experts}), got {num_replicas}; with "
            "runtime.redundant_experts > 0 the extra slots have no contiguous meaning, use rebalance_experts"
        )
    return torch.arange(num_experts, dtype=torch.int64).expand(num_layers, -1).contiguous()
