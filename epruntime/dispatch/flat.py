"""``flat``: one uneven all-to-all over the world group (counts first, then rows). The baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    DispatchResult,
    Dispatcher,
    all_to_all_rows,
    count_tokens_per_expert,
    exchange_counts,
    pack_routing,
    unpack_routing,
)


@dataclass
class FlatHandle:
    """What combine needs: which source token each sent row was, and the split sizes."""

    send_token: torch.Tensor  # [P] int64 source token of each sent row, ordered by destination rank
    send_counts: list[int]  # [W] rows sent to each rank
    recv_counts: list[int]  # [W] rows received from each rank
    num_tokens: int


def destinations(topk_idx: torch.Tensor, experts_per_dest: int, num_dests: int) -> torch.Tensor:
    """[T, D] bool: does token t need destination d (a rank, or a node) for any of its experts."""
    dest = torch.div(topk_idx, experts_per_dest, rounding_mode="floor")  # [T, K]
    return torch.zeros(topk_idx.shape[0], num_dests, dtype=torch.bool).scatter_(1, dest, True)


def localize(topk_idx: torch.Tensor, first_expert: torch.Tensor, num_local: int) -> torch.Tensor:
    """Global ids [P, K] -> ids local to each row's destination (first id ``first_expert [P]``), -1 elsewhere."""
    local = topk_idx - first_expert.unsqueeze(1)  # [P, K]
    return torch.where((local >= 0) & (local < num_local), local, torch.full_like(local, -1))


class FlatDispatcher(Dispatcher):
    """All ranks talk to all ranks in one all-to-all; each token goes once to each destination rank."""

    name = "flat"

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        world, e_local = self.rt.world_size, self.rt.topo.experts_per_rank
        group = self.rt.world_group
        needs = destinations(topk_idx.cpu(), e_local, world)  # [T, W]
        dest_rank, send_token = needs.t().nonzero(as_tuple=True)  # [P], [P] ordered by destination
        send_counts = needs.sum(dim=0)  # [W]
        recv_counts = exchange_counts(send_counts, group).tolist()
        send_counts = send_counts.tolist()
        send_token = send_token.to(x.device)
        routing = pack_routing(
            localize(topk_idx[send_token], dest_rank.to(x.device) * e_local, e_local), topk_weights[send_token]
        )  # [P, 2K] int32
        recv_x = all_to_all_rows(x[send_token], send_counts, recv_counts, group)  # [R, H]
        recv_idx, recv_weights = unpack_routing(all_to_all_rows(routing, send_counts, recv_counts, group))
        ranks = list(range(world))
        self.count_sends("dispatch", ranks, send_counts, x.shape[1] * x.element_size(), routing.shape[1] * 4)
        return DispatchResult(
            recv_x=recv_x,
            recv_topk_idx=recv_idx,
            recv_topk_weights=recv_weights,
            tokens_per_expert=count_tokens_per_expert(recv_idx, e_local),
            handle=FlatHandle(send_token, send_counts, recv_counts, x.shape[0]),
        )

    def combine(self, y: torch.Tensor, handle: FlatHandle) -> torch.Tensor:
        back = all_to_all_rows(y, handle.recv_counts, handle.send_counts, self.rt.world_group)  # [P, H]
        self.count_sends("combine", list(range(self.rt.world_size)), handle.recv_counts, y.shape[1] * y.element_size(), 0)
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)  # [T, H]
        out.index_add_(0, handle.send_token, back.float())
        return out.to(y.dtype)
