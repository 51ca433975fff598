"""Rank layout: which node and local index a rank has, and which experts it owns.

Rank ``r`` sits on node ``r // ranks_per_node`` at local index ``r % ranks_per_node`` and owns the
contiguous experts ``[r * E_local, (r + 1) * E_local)``. Two process groups sit beside the world:
``intra`` (the ranks of one node) and ``rail`` (the ranks with the same local index on every node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Topology:
    """Pure placement arithmetic for ``nnodes x ranks_per_node`` ranks and ``num_experts`` experts."""

    nnodes: int
    ranks_per_node: int
    num_experts: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world_size

    @property
    def experts_per_node(self) -> int:
        return self.experts_per_rank * self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_index_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        """The ranks of one node, in local-index order (the intra group)."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def rail_ranks(self, local_index: int) -> list[int]:
        """The ranks with one local index on every node, in node order (the rail group)."""
        return [node * self.ranks_per_node + local_index for node in range(self.nnodes)]

    def expert_range(self, rank: int) -> range:
        """Global ids of the experts rank ``rank`` owns."""
        start = rank * self.experts_per_rank
        return range(start, start + self.experts_per_rank)

    def rank_of_expert(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Owning rank of each global expert id (same shape as the input)."""
        return torch.div(expert_ids, self.experts_per_rank, rounding_mode="floor")

    def node_of_expert(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Owning node of each global expert id (same shape as the input)."""
        return torch.div(expert_ids, self.experts_per_node, rounding_mode="floor")
