"""Moving expert weights from one placement to the next: keep what can stay, plan each changed slot's source,
send the rest peer to peer.

A placement is a ``phy2log [P]`` row; slot ``p`` lives on EP rank ``p // S`` (``S`` slots per rank), rank ``r``
on node ``r // ranks_per_node``. :func:`align` relabels a new placement so that as many slots as possible keep
their expert without changing the load any rank carries (whole nodes and whole ranks are matched to the old ones
with the most experts in common, then each rank's experts go back to the slots that held them). :func:`plan_moves`
then gives every changed slot one deterministic source: the destination rank itself when it held that expert
(a local copy), else a rank of its node that held it, else the lowest rank that held it; a rank that needs one
expert in two changed slots receives it once. :func:`move_slots` runs a plan on this rank's slot tensors: every
send reads a slot and every receive lands in one, in place (no packing; the tensors keep their storage, so a
captured CUDA graph still sees them), all posted together (``batch_isend_irecv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _greedy_match(overlap: torch.Tensor) -> list[int]:  # [n old, n new] -> new index of each old one
    """Match old to new items one pair at a time, the pair with the most in common first (ties: lowest indices)."""
    n = overlap.shape[0]
    score = overlap.clone().to(torch.float64)  # [n, n]
    match = [-1] * n
    for _ in range(n):
        flat = int(torch.argmax(score))  # first maximum in row-major order: lowest old, then lowest new
        old, new = divmod(flat, n)
        match[old] = new
        score[old, :] = -1.0
        score[:, new] = -1.0
    return match


def _counts(row: torch.Tensor, num_groups: int, num_experts: int) -> torch.Tensor:  # [P] -> [num_groups, E]
    """How many replicas of each expert each of ``num_groups`` equal consecutive blocks of slots holds."""
    groups = row.view(num_groups, -1)  # [G, P / G]
    out = torch.zeros(num_groups, num_experts, dtype=torch.int64)
    return out.scatter_add_(1, groups, torch.ones_like(groups))


def align(
    old: torch.Tensor, new: torch.Tensor, slots_per_rank: int, ranks_per_node: int, num_experts: int, keep_nodes: bool
) -> torch.Tensor:  # [P] old and new phy2log -> [P] the new placement, relabelled to move least
    """``new`` with its nodes (unless ``keep_nodes``: node-limited routing pins experts to their node), its ranks
    inside each node and its slots inside each rank permuted to keep as many of ``old``'s slots as possible.
    Every rank keeps the multiset of experts ``new`` gives some rank of the same node, so the predicted per-rank
    loads are ``new``'s, only relabelled."""
    old, new = old.long().cpu(), new.long().cpu()
    num_slots = len(new)
    ranks = num_slots // slots_per_rank
    nodes = ranks // ranks_per_node
    per_node = num_slots // nodes
    node_blocks = new.view(nodes, per_node)  # [N, P / N]
    if not keep_nodes and nodes > 1:
        c_old, c_new = _counts(old, nodes, num_experts), _counts(new, nodes, num_experts)  # [N, E] each
        match = _greedy_match(torch.minimum(c_old[:, None], c_new[None]).sum(-1))  # [N] new node of each old node
        node_blocks = node_blocks[match]
    out = torch.empty_like(new)
    for n in range(nodes):
        block = node_blocks[n].view(ranks_per_node, slots_per_rank)  # [R_n, S] this node's new ranks
        old_block = old[n * per_node : (n + 1) * per_node]
        c_old = _counts(old_block, ranks_per_node, num_experts)  # [R_n, E]
        c_new = _counts(block.reshape(-1), ranks_per_node, num_experts)
        match = _greedy_match(torch.minimum(c_old[:, None], c_new[None]).sum(-1))  # [R_n]
        for local, new_rank in enumerate(match):
            first = n * per_node + local * slots_per_rank
            out[first : first + slots_per_rank] = _keep_slots(old[first : first + slots_per_rank], block[new_rank])
    return out


def _keep_slots(old: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:  # [S], [S] multiset -> [S]
    """The experts of one rank laid over its slots: each expert the slot held already stays there, the others
    fill the remaining slots in ascending order."""
    left = sorted(experts.tolist())
    slots: list[int | None] = []
    for e in old.tolist():
        if e in left:
            left.remove(e)
            slots.append(e)
        else:
            slots.append(None)
    fill = iter(left)
    return torch.tensor([e if e is not None else next(fill) for e in slots], dtype=torch.int64)


@dataclass(frozen=True)
class Move:
    """One changed slot: ``dest_slot`` (global) gets ``expert`` from ``src_slot`` (global, in the old placement) on
    ``src_rank``; ``duplicate`` when its rank receives that expert for another slot already (a local copy)."""

    dest_slot: int
    expert: int
    src_rank: int
    src_slot: int
    duplicate: bool = False


@dataclass(frozen=True)
class MovePlan:
    """Every changed slot of a rebalance, in slot order, for the whole EP world (each rank runs its part)."""

    moves: tuple[Move, ...]
    slots_per_rank: int

    def dest_rank(self, move: Move) -> int:
        return move.dest_slot // self.slots_per_rank

    def is_local(self, move: Move) -> bool:
        """Filled without crossing ranks: the rank held the expert already, or receives it for another slot."""
        return move.duplicate or move.src_rank == self.dest_rank(move)

    def remote(self) -> list[Move]:
        """The moves that cross ranks (one per destination rank and expert)."""
        return [m for m in self.moves if not self.is_local(m)]

    def sends(self, rank: int) -> dict[int, list[Move]]:
        """Destination rank -> the moves ``rank`` sends there, in slot order."""
        out: dict[int, list[Move]] = {}
        for m in self.remote():
            if m.src_rank == rank:
                out.setdefault(self.dest_rank(m), []).append(m)
        return out

    def receives(self, rank: int) -> dict[int, list[Move]]:
        """Source rank -> the moves ``rank`` receives from there, in slot order."""
        out: dict[int, list[Move]] = {}
        for m in self.remote():
            if self.dest_rank(m) == rank:
                out.setdefault(m.src_rank, []).append(m)
        return out


def plan_moves(old: torch.Tensor, new: torch.Tensor, slots_per_rank: int, ranks_per_node: int) -> MovePlan:
    """The source of every slot whose expert differs between ``old [P]`` and ``new [P]`` (the module's rules)."""
    old_row, new_row = old.long().cpu().tolist(), new.long().cpu().tolist()
    holders: dict[int, dict[int, int]] = {}  # expert -> {rank: its lowest old slot there}
    for p, e in enumerate(old_row):
        holders.setdefault(e, {}).setdefault(p // slots_per_rank, p)
    moves, received = [], set()  # (rank, expert) pairs already crossing ranks
    for p, (was, e) in enumerate(zip(old_row, new_row, strict=True)):
        if was == e:
            continue
        dest = p // slots_per_rank
        have = holders.get(e)
        if have is None:
            raise ValueError(f"plan_moves: slot {p} needs expert {e}, which no slot of the old placement holds")
        if dest in have:
            src = dest
        elif (dest, e) in received:
            moves.append(Move(p, e, dest, -1, duplicate=True))
            continue
        else:
            near = [r for r in sorted(have) if r // ranks_per_node == dest // ranks_per_node]
            src = near[0] if near else min(have)
            received.add((dest, e))
        moves.append(Move(p, e, src, have[src]))
    return MovePlan(tuple(moves), slots_per_rank)


def slot_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of one slot over every per-slot tensor (``[S, ...]`` each): what moving one expert slice costs."""
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _bytes(t: torch.Tensor) -> torch.Tensor:  # [S, ...] -> [S, B_t] uint8 view of the same storage
    """A per-slot tensor as raw bytes, one row per slot: every dtype (FP8 too) moves and copies as uint8."""
    return t.data.view(t.shape[0], -1).view(torch.uint8)


def move_slots(tensors: list[torch.Tensor], plan: MovePlan, rank: int, group: dist.ProcessGroup) -> int:
    """Run this EP rank's part of ``plan`` on its per-slot tensors ``[S, ...]`` (the old placement's contents, the
    new one's when it returns): send what peers need, receive and copy what its changed slots need. Returns the
    bytes sent.

    Sends read the slots and receives land in them directly (one message per slot and tensor, no packing); only a
    slot that is both sent (or copied) and overwritten is copied aside first. Every message of one pair is posted
    in plan order on both sides, so the two sides match them up."""
    if not tensors or not plan.moves:
        return 0
    raw = [_bytes(t) for t in tensors]  # [S, B_t] each
    first = rank * plan.slots_per_rank
    mine = [m for m in plan.moves if plan.dest_rank(m) == rank]
    overwritten = {m.dest_slot - first for m in mine}
    sends = [m for _, moves in sorted(plan.sends(rank).items()) for m in moves]
    copies = [m for m in mine if m.src_rank == rank and not m.duplicate]
    read = {m.src_slot - first for m in sends + copies}
    aside = {q: [r[q].clone() for r in raw] for q in sorted(read & overwritten)}  # old contents still needed

    def old(q: int) -> list[torch.Tensor]:  # local slot q's old contents, one [B_t] row per tensor
        return aside[q] if q in aside else [r[q] for r in raw]

    ops = []
    for m in sends:
        peer = dist.get_global_rank(group, plan.dest_rank(m))
        ops += [dist.P2POp(dist.isend, row, peer, group) for row in old(m.src_slot - first)]
    for src, moves in sorted(plan.receives(rank).items()):
        peer = dist.get_global_rank(group, src)
        ops += [dist.P2POp(dist.irecv, r[m.dest_slot - first], peer, group) for m in moves for r in raw]
    for m in copies:  # the old contents of a slot this rank held (set aside if it is overwritten)
        for r, row in zip(raw, old(m.src_slot - first), strict=True):
            r[m.dest_slot - first].copy_(row)
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    landed = {m.expert: m.dest_slot - first for m in mine if not m.duplicate}
    for m in mine:
        if m.duplicate:  # a second slot of an expert received once
            for r in raw:
                r[m.dest_slot - first].copy_(r[landed[m.expert]])
    return sum(slot_bytes(tensors) for _ in sends)
