"""Physical expert slots and the replica each (token, expert) pair goes to.

An MoE layer has ``E`` logical experts (what the router picks) and ``P = E + R`` physical slots (what the
dispatchers move rows to): ``phy2log[p]`` is the logical expert slot ``p`` holds, and slot ``p`` lives on
EP rank ``p // (P / W)``. ``contiguous`` with ``R = 0`` is the identity (slot ``p`` holds expert ``p``).

Replica choice (:meth:`ExpertPlacement.choose`) is deterministic and needs no host sync. For each
(token, k) pair of logical expert ``e``, in order of preference:

1. a replica on the token's own EP rank;
2. else one on its own node;
3. else one on a node the token already goes to for another of its pairs (chosen by rules 1-2, or the
   only replica of its expert), so hierarchical dispatch crosses no extra node;
4. else any replica.

Among the replicas the first rule that applies allows, the pairs are spread evenly: pair ``j`` (its global
position, ``(ep_rank * T + t) * K + k``) takes the ``j mod n``-th of the ``n`` allowed, so two replicas of a
hot expert on one node share its load instead of the first one taking all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.config.placement_file import CONTIGUOUS, read_phy2log
from epruntime.config.schema import Config
from epruntime.eplb.placement import logical_maps


@dataclass(frozen=True)
class ExpertPlacement:
    """One layer's slots: ``phy2log [P]``, its inverse ``log2phy [E, C]`` (-1 padded) and ``logcnt [E]``."""

    phy2log: torch.Tensor  # [P] int64 logical expert of each physical slot
    log2phy: torch.Tensor  # [E, C] int64 physical slots of each logical expert, -1 past its count
    logcnt: torch.Tensor  # [E] int64 replicas per logical expert
    slots_per_rank: int
    ranks_per_node: int

    @classmethod
    def from_row(
        cls, row: list[int] | torch.Tensor, num_experts: int, ep_world: int, ranks_per_node: int
    ) -> ExpertPlacement:
        """The placement of one ``phy2log`` row over an EP world of ``ep_world`` ranks, ``ranks_per_node`` per node."""
        phy2log = torch.as_tensor(row, dtype=torch.int64)  # [P]
        log2phy, logcnt = logical_maps(phy2log.unsqueeze(0), num_experts)  # [1, E, C], [1, E]
        return cls(phy2log, log2phy[0], logcnt[0], len(phy2log) // ep_world, ranks_per_node)

    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    @property
    def is_identity(self) -> bool:
        """Slot ``p`` holds expert ``p``: the router's ids are the slots."""
        return bool(torch.equal(self.phy2log, torch.arange(self.num_slots)))

    def experts_of(self, ep_rank: int) -> list[int]:
        """Logical expert of each of ``ep_rank``'s slots, in slot order (a repeated id is a second replica)."""
        first = ep_rank * self.slots_per_rank
        return self.phy2log[first : first + self.slots_per_rank].tolist()

    def to(self, device: torch.device) -> ExpertPlacement:
        """The same placement with its tables on ``device`` (what :meth:`choose` indexes with)."""
        move = {k: getattr(self, k).to(device) for k in ("phy2log", "log2phy", "logcnt")}
        return ExpertPlacement(**move, slots_per_rank=self.slots_per_rank, ranks_per_node=self.ranks_per_node)

    def choose(self, topk_idx: torch.Tensor, ep_rank: int) -> torch.Tensor:  # [T, K] logical -> [T, K] slots
        """The physical slot each (token, k) pair of this EP rank's tokens goes to (the module's rules; among the
        replicas a rule allows, pairs are spread by their position)."""
        t, k = topk_idx.shape
        device = topk_idx.device
        cand = self.log2phy[topk_idx]  # [T, K, C] candidate slots, -1 padded
        valid = cand >= 0
        cand_rank = torch.div(cand.clamp(min=0), self.slots_per_rank, rounding_mode="floor")  # [T, K, C]
        cand_node = torch.div(cand_rank, self.ranks_per_node, rounding_mode="floor")
        on_rank = valid & (cand_rank == ep_rank)
        on_node = valid & (cand_node == ep_rank // self.ranks_per_node)
        pair = (ep_rank * t + torch.arange(t, device=device)).unsqueeze(1) * k + torch.arange(k, device=device)
        near = torch.where(on_rank.any(-1, keepdim=True), on_rank, on_node)  # [T, K, C] rules 1, then 2
        only = valid & (self.logcnt[topk_idx] == 1).unsqueeze(-1)  # the single replica
        settled = torch.where(near.any(-1, keepdim=True), near, only)  # [T, K, C]
        settled_pick = _spread(settled, pair)  # [T, K] candidate index, -1 where unsettled
        settled_node = cand_node.gather(2, settled_pick.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [T, K]
        num_nodes = self.num_slots // self.slots_per_rank // self.ranks_per_node
        used = torch.zeros(t, num_nodes + 1, dtype=torch.bool, device=device)  # the last column: none
        used.scatter_(1, torch.where(settled_pick >= 0, settled_node, num_nodes), True)
        goes_there = valid & used.gather(1, cand_node.flatten(1)).view_as(cand)  # [T, K, C] rule 3
        rest = torch.where(goes_there.any(-1, keepdim=True), goes_there, valid)  # rule 3, else 4: every replica
        pick = torch.where(settled_pick >= 0, settled_pick, _spread(rest, pair))
        return cand.gather(2, pick.unsqueeze(-1)).squeeze(-1)  # [T, K]


def _spread(allowed: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:  # [T, K, C] bool, [T, K] -> [T, K]
    """Per pair, the ``(pair mod n)``-th of its ``n`` allowed candidates (its index in C); -1 where none is allowed."""
    count = allowed.sum(-1)  # [T, K]
    nth = torch.remainder(pair, count.clamp(min=1)).unsqueeze(-1)  # [T, K, 1]
    hit = allowed & (allowed.long().cumsum(-1) - 1 == nth)  # [T, K, C] exactly one True where count > 0
    return torch.where(count > 0, hit.long().argmax(-1), -1)


def placement_rows(cfg: Config) -> list[list[int]]:
    """Every ``phy2log`` row the config names: the file's, or the one identity row of ``contiguous``."""
    e, r = cfg.model.n_routed_experts, cfg.runtime.redundant_experts
    if cfg.runtime.placement == CONTIGUOUS:
        return [list(range(e + r)) if r == 0 else [p % e for p in range(e + r)]]
    return read_phy2log(cfg.runtime.placement, e, e + r)
