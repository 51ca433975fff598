"""``lowlatency``: DeepEP low-latency mode's layout on torch.distributed, fixed size and count-free.

Every rank sends every rank one block of ``M = runtime.max_tokens_per_rank`` slots: slot ``t``
carries token ``t`` (slots past the rank's ``T`` tokens are padding) and its top-k restricted to the
receiver's experts, packed with the activations into one byte row. Dispatch is therefore a single
all-to-all of a fixed size, with no count exchange and no host synchronisation (CUDA-graph safe).
The receiver lays the rows out as DeepEP's ``low_latency_dispatch`` does: ``recv_x [E_local, C, H]``
with ``C = M * world_size``, expert ``e``'s ``masked_m[e]`` rows first, ordered by source rank and
token. Combine takes the experts' unweighted outputs in that layout, applies the routing weights,
sums them per (source rank, slot) and returns one fixed block to every rank, where the blocks are
summed per token (DeepEP's ``low_latency_combine``, which also applies the weights).

Capacity: a rank with more than ``M`` tokens raises before sending anything (never a silent drop).
As with DeepEP, its peers then wait in the collective until ``runtime.timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from epruntime.dispatch.base import AsyncDispatcher, InFlight, MaskedDispatchResult, pack_routing, unpack_routing


class CapacityError(ValueError):
    """More tokens on a rank than a fixed-capacity dispatcher can carry."""


def check_capacity(num_tokens: int, capacity: int, backend: str) -> None:
    """Raise a one-line :class:`CapacityError` when ``num_tokens`` does not fit ``capacity``."""
    if num_tokens > capacity:
        raise CapacityError(
            f"{backend} dispatch: {num_tokens} tokens on this rank exceed runtime.max_tokens_per_rank={capacity}; "
            f"raise runtime.max_tokens_per_rank or split the batch"
        )


@dataclass
class LowLatencyHandle:
    """What combine needs, indexed by received slot ``s = source_rank * M + t`` and local expert ``e``."""

    hit: torch.Tensor  # [S, E_local] bool: slot s chose local expert e
    position: torch.Tensor  # [S, E_local] int64 row of (s, e) in expert e's block (0 where not hit)
    weight: torch.Tensor  # [S, E_local] fp32 routing weight of (s, e) (0 where not hit)
    num_tokens: int  # T on this rank


def block_routing(
    topk_idx: torch.Tensor,  # [T, K] global expert ids (-1: none)
    topk_weights: torch.Tensor,  # [T, K]
    world: int,
    e_local: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # [W, M, K] local ids (-1 elsewhere / padding), [W, M, K] fp32
    """Each destination rank's view of every slot's top-k: ids local to it, -1 for other ranks' experts."""
    t = topk_idx.shape[0]
    first = torch.arange(world, device=topk_idx.device).view(world, 1, 1) * e_local  # [W, 1, 1]
    local = topk_idx.unsqueeze(0) - first  # [W, T, K]
    mine = (local >= 0) & (local < e_local) & (topk_idx >= 0)
    ids = torch.full((world, capacity, topk_idx.shape[1]), -1, dtype=torch.int64, device=topk_idx.device)
    weights = torch.zeros(ids.shape, dtype=torch.float32, device=topk_idx.device)
    ids[:, :t] = torch.where(mine, local, -1)
    weights[:, :t] = torch.where(mine, topk_weights.float(), 0.0)
    return ids, weights


def expert_layout(
    ids: torch.Tensor,  # [S, K] local expert ids of every received slot, -1 elsewhere
    weights: torch.Tensor,  # [S, K] fp32
    e_local: int,
    num_tokens: int,
) -> tuple[torch.Tensor, LowLatencyHandle, torch.Tensor]:
    """Where each (slot, expert) pair sits in the ``[E_local, S]`` masked layout.

    Returns ``source [E_local * S]`` (the slot whose row fills each position; padding positions
    point at slot 0), the combine handle and ``masked_m [E_local]`` int32.
    """
    s = ids.shape[0]
    onehot = ids.unsqueeze(2) == torch.arange(e_local, device=ids.device)  # [S, K, E]
    hit = onehot.any(dim=1)  # [S, E]
    pair_weight = (weights.unsqueeze(2) * onehot).sum(dim=1)  # [S, E]; top-k ids are distinct
    position = torch.where(hit, hit.long().cumsum(dim=0) - 1, 0)  # [S, E] ordered by slot
    flat = torch.where(hit, torch.arange(e_local, device=ids.device) * s + position, e_local * s)  # [S, E]
    slot = torch.arange(s, device=ids.device).unsqueeze(1).expand(s, e_local)  # [S, E]
    source = torch.zeros(e_local * s + 1, dtype=torch.int64, device=ids.device)  # last entry collects misses
    source.scatter_(0, flat.reshape(-1), slot.reshape(-1))
    handle = LowLatencyHandle(hit=hit, position=position, weight=pair_weight, num_tokens=num_tokens)
    return source[:-1], handle, hit.sum(dim=0).to(torch.int32)


def weighted_partials(y: torch.Tensor, handle: LowLatencyHandle) -> torch.Tensor:
    """``y [E_local, S, H]`` -> ``[S, H]`` fp32: per slot, the sum of its experts' outputs times their weights."""
    out = torch.zeros(handle.hit.shape[0], y.shape[2], dtype=torch.float32, device=y.device)  # [S, H]
    for e in range(y.shape[0]):  # one gather per local expert keeps memory at [S, H]
        rows = y[e].index_select(0, handle.position[:, e]).float()  # [S, H]
        out += torch.where(handle.hit[:, e, None], rows * handle.weight[:, e, None], 0.0)
    return out


class LowLatencyDispatcher(AsyncDispatcher):
    """Fixed ``max_tokens_per_rank`` slots per rank pair; one all-to-all each way, no counts."""

    name = "lowlatency"

    @property
    def capacity(self) -> int:
        """Slots per (source rank, destination rank) block: ``runtime.max_tokens_per_rank``."""
        return self.spec.capacity

    def _exchange(self, block: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:  # [W, M, B] -> [W, M, B]
        out = torch.empty_like(block)
        return out, dist.all_to_all_single(out, block, group=self.ep.world, async_op=True)

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        world, e_local, m = self.ep.world_size, self.slots_per_rank, self.capacity
        t, h = x.shape
        check_capacity(t, m, self.name)
        ids, weights = block_routing(topk_idx, topk_weights, world, e_local, m)  # [W, M, K] each
        rows = x.new_zeros(m, h)  # [M, H]
        rows[:t] = x
        meta = pack_routing(ids.view(world * m, -1), weights.view(world * m, -1)).view(world, m, -1)  # [W, M, 2K]
        row_bytes = rows.view(torch.uint8)  # [M, H * elt]
        block = torch.cat([row_bytes.expand(world, m, -1), meta.view(torch.uint8)], dim=2)  # [W, M, B]
        received, work = self._exchange(block)
        self.count_sends("dispatch", list(range(world)), [m] * world, row_bytes.shape[1], meta.shape[2] * 4)

        def finish() -> MaskedDispatchResult:
            split = row_bytes.shape[1]
            recv_rows = received[..., :split].contiguous().view(x.dtype).view(world * m, h)  # [S, H]
            recv_ids, recv_weights = unpack_routing(received[..., split:].contiguous().view(torch.int32).flatten(0, 1))
            source, handle, masked_m = expert_layout(recv_ids, recv_weights, e_local, t)
            return MaskedDispatchResult(
                recv_x=recv_rows[source].view(e_local, world * m, h), masked_m=masked_m, handle=handle
            )

        return InFlight([work], finish)

    def combine_a(self, y: torch.Tensor, handle: LowLatencyHandle) -> InFlight:
        world, m, h = self.ep.world_size, self.capacity, y.shape[2]
        partial = weighted_partials(y, handle).to(y.dtype).view(world, m, h)  # [W, M, H] per source rank
        back, work = self._exchange(partial)  # [W, M, H]: this rank's slots, summed on each expert rank
        self.count_sends("combine", list(range(world)), [m] * world, h * y.element_size(), 0)
        return InFlight([work], lambda: back[:, : handle.num_tokens].float().sum(dim=0).to(y.dtype))  # [T, H]
