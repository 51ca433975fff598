"""``flat``: one uneven all-to-all over the world group (counts first, then rows). The baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epruntime.dispatch.base import (
    AsyncDispatcher,
    Hop,
    InFlight,
    pack_routing,
)


@dataclass
class FlatHandle:
    """What combine needs: the world hop of the dispatch and the number of source tokens."""

    hop: Hop
    num_tokens: int


def destinations(topk_idx: torch.Tensor, experts_per_dest: int, num_dests: int) -> torch.Tensor:
    """[T, D] bool: does token t need destination d (a rank, or a node) for any of its experts."""
    dest = torch.div(topk_idx, experts_per_dest, rounding_mode="floor")  # [T, K]
    return torch.zeros(topk_idx.shape[0], num_dests, dtype=torch.bool).scatter_(1, dest, True)


def localize(topk_idx: torch.Tensor, first_expert: torch.Tensor, num_local: int) -> torch.Tensor:
    """Global ids [P, K] -> ids local to each row's destination (first id ``first_expert [P]``), -1 elsewhere."""
    local = topk_idx - first_expert.unsqueeze(1)  # [P, K]
    return torch.where((local >= 0) & (local < num_local), local, torch.full_like(local, -1))


class FlatDispatcher(AsyncDispatcher):
    """All ranks talk to all ranks in one all-to-all; each token goes once to each destination rank."""

    name = "flat"

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        world, e_local = self.ep.world_size, self.slots_per_rank
        needs = destinations(topk_idx.cpu(), e_local, world)  # [T, W]
        hop = Hop.plan(needs, self.ep.world, list(range(world)), x.device)
        rows = hop.src_row
        routing = pack_routing(localize(topk_idx[rows], hop.dest * e_local, e_local), topk_weights[rows])  # [P, 2K]
        self.count_sends("dispatch", hop.peers, hop.send_counts, x.shape[1] * x.element_size(), routing.shape[1] * 4)
        return hop.issue_dispatch(x[rows], routing, e_local, FlatHandle(hop, x.shape[0]))

    def combine_a(self, y: torch.Tensor, handle: FlatHandle) -> InFlight:
        hop = handle.hop
        back = hop.issue_reduce_back(y, handle.num_tokens)  # in flight: [T, H] fp32
        self.count_sends("combine", hop.peers, hop.recv_counts, y.shape[1] * y.element_size(), 0)
        return InFlight([], lambda: back.wait().to(y.dtype))
