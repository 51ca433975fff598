"""Local search over replica counts: move one replica from one expert to another while that lowers the heaviest GPU.

The greedy replication minimises the largest load per replica, but a GPU's load is a sum of replicas, so the best
counts for the packing can differ (nine equal replicas on eight GPUs put two on one GPU; eight would not). Each round
re-packs (greedy, then refined) the moves below for every problem still improving, batched, and keeps the best one
that lowers the heaviest GPU.
"""

from __future__ import annotations

import torch

from epruntime.eplb.packing import greedy_pack, pack_loads, refine_pack

_REL_TOL = 1e-12
# A problem whose heaviest GPU is within this fraction of its lower bound is left as it is.
CLOSE_ENOUGH = 1e-5


def pack(slot_w: torch.Tensor, num_bins: int, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the replicas ``slot_w [B, S]`` onto ``num_bins`` GPUs; returns ``gpu_of [B, S]`` and the peak ``[B]``."""
    gpu_of = greedy_pack(slot_w, num_bins)  # [B, S]
    if refine:
        gpu_of = refine_pack(slot_w, gpu_of, num_bins)
    return gpu_of, pack_loads(slot_w, gpu_of, num_bins).max(-1).values


def counts_to_slots(count: torch.Tensor) -> torch.Tensor:
    """``slot2item [B, S]`` listing item ``i`` ``count[b, i]`` times, in item order (every row must sum to ``S``)."""
    ends = count.cumsum(-1)  # [B, n]
    slots = torch.arange(int(ends[0, -1])).expand(count.shape[0], -1).contiguous()  # [B, S]
    return torch.searchsorted(ends, slots, right=True)


def slot_counts(slot2item: torch.Tensor, num_items: int) -> torch.Tensor:
    """Replicas per item, ``[B, n]``, of ``slot2item [B, S]``."""
    count = torch.zeros(slot2item.shape[0], num_items, dtype=torch.int64)
    return count.scatter_add_(-1, slot2item, torch.ones_like(slot2item))


def _argmax_heavier(score: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the highest ``score`` (ties: the higher ``weight``, then the lower index); ``[B]``."""
    top = score == score.max(-1, keepdim=True).values  # [B, n]
    return torch.where(top, weight, -1.0).argmax(-1)


def _moves(
    weight: torch.Tensor, count: torch.Tensor, slot2item: torch.Tensor, gpu_of: torch.Tensor, num_bins: int, width: int
) -> list[torch.Tensor]:
    """Candidate counts ``[B, n]`` (the unchanged ``count`` where a move does not exist), ``2 * width`` of them.

    Into the heaviest GPU's largest replica, from each of the ``width`` experts that lose least by giving one up;
    and out of the heaviest GPU's largest expert with more than one replica, into each of the ``width`` experts with
    the largest load per replica.
    """
    batch, n = weight.shape
    rows = torch.arange(batch)
    width = min(width, n - 1)
    slot_w = (weight / count).gather(-1, slot2item)  # [B, S]
    heavy = pack_loads(slot_w, gpu_of, num_bins).argmax(-1)  # [B]
    there = (gpu_of == heavy.unsqueeze(-1)).long()  # [B, S]
    on_heavy = torch.zeros(batch, n, dtype=torch.int64).scatter_add_(-1, slot2item, there) > 0  # [B, n]
    neg = torch.tensor(-1.0, dtype=weight.dtype)
    per = weight / count  # [B, n]
    out = []

    # Into the heaviest GPU's largest replica, from the donors whose replicas grow least.
    into = _argmax_heavier(torch.where(on_heavy, per, neg), weight)  # [B]
    after = weight / (count - 1).clamp_min(1)  # [B, n]: a donor's load per replica once it gives one up
    can_give = (count > 1) & (torch.arange(n) != into.unsqueeze(-1))  # [B, n]
    donors = torch.sort(torch.where(can_give, after, torch.inf), dim=-1, stable=True).indices[:, :width]  # [B, k]
    for k in range(width):
        out.append(_move(count, rows, donors[:, k], into, can_give.gather(-1, donors[:, k : k + 1]).squeeze(-1)))

    # Out of the heaviest GPU's largest multi-replica expert, into the experts with the largest load per replica.
    give = on_heavy & (count > 1)  # [B, n]
    donor = _argmax_heavier(torch.where(give, per, neg), weight)  # [B]
    others = torch.where(torch.arange(n) != donor.unsqueeze(-1), per, neg)  # [B, n]
    by_weight = torch.sort(weight, dim=-1, descending=True, stable=True).indices  # [B, n]: ties to the heavier
    order = torch.sort(others.gather(-1, by_weight), dim=-1, descending=True, stable=True).indices  # [B, n]
    ranked = by_weight.gather(-1, order)  # [B, n]: receivers, best first
    for k in range(width):
        into = ranked[:, k]  # [B]
        out.append(_move(count, rows, donor, into, give.any(-1) & (into != donor)))
    return out


def _move(
    count: torch.Tensor, rows: torch.Tensor, donor: torch.Tensor, into: torch.Tensor, ok: torch.Tensor
) -> torch.Tensor:
    """``count`` with one replica moved from ``donor`` to ``into`` in the rows where ``ok``; ``[B, n]``."""
    new = count.clone()
    new[rows[ok], donor[ok]] -= 1
    new[rows[ok], into[ok]] += 1
    return new


def improve_counts(
    weight: torch.Tensor,
    slot2item: torch.Tensor,
    gpu_of: torch.Tensor,
    peak: torch.Tensor,
    bound: torch.Tensor,
    num_bins: int,
    rounds: int,
    width: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move replicas between experts while it lowers each problem's heaviest GPU (at most ``rounds`` moves, each the
    best of ``2 * width`` candidates).

    ``weight [B, n]``; the placement is ``slot2item [B, S]`` and ``gpu_of [B, S]`` with heaviest GPU ``peak [B]``;
    problems within a factor ``1 + CLOSE_ENOUGH`` of ``bound [B]`` are left alone. Returns the new ``slot2item``,
    ``gpu_of`` and ``peak``.
    """
    slot2item, gpu_of, peak = slot2item.clone(), gpu_of.clone(), peak.clone()
    active = peak > bound * (1 + CLOSE_ENOUGH)  # [B]
    for _ in range(rounds):
        idx = active.nonzero().squeeze(-1)  # [A]
        if idx.numel() == 0:
            break
        w = weight[idx]  # [A, n]
        count = slot_counts(slot2item[idx], w.shape[1])  # [A, n]
        best_pk = peak[idx].clone()  # [A]
        best_s2i, best_g = slot2item[idx].clone(), gpu_of[idx].clone()
        for cnt in _moves(w, count, slot2item[idx], gpu_of[idx], num_bins, width):
            changed = (cnt != count).any(-1)  # [A]
            if not bool(changed.any()):
                continue
            sub = changed.nonzero().squeeze(-1)
            s2i = counts_to_slots(cnt[sub])  # [C, S]
            g, pk = pack((w[sub] / cnt[sub]).gather(-1, s2i), num_bins, refine=True)
            better = pk < best_pk[sub] * (1 - _REL_TOL)
            sub = sub[better]
            best_pk[sub], best_s2i[sub], best_g[sub] = pk[better], s2i[better], g[better]
        improved = best_pk < peak[idx]  # [A]
        active[idx[~improved]] = False
        active[idx] &= best_pk > bound[idx] * (1 + CLOSE_ENOUGH)
        peak[idx], slot2item[idx], gpu_of[idx] = best_pk, best_s2i, best_g
    return slot2item, gpu_of, peak
