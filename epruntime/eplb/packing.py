"""The three batched steps of a placement: replicate experts, pack items into equal-count bins, refine a packing.

Every function works on a batch of independent problems (one row per layer, or per layer and node) at once, so the
Python loops run over items, never over layers. Loads are float64; ties go to the lowest index (``argmax`` and
``argmin`` return the first extreme, sorts are stable), so the same input gives the same output.
"""

from __future__ import annotations

import torch

# A swap must lower the heaviest bin by more than this fraction of its load to count (float noise is not progress).
_REL_TOL = 1e-12


def replicate(
    weight: torch.Tensor, num_slots: int, max_count: int = 0, hot: int = -1, heavier_ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``num_slots - n`` extra replicas, one at a time, to the expert with the highest load per replica.

    ``weight`` is ``[B, n]``. Returns ``slot2item [B, num_slots]`` (slot ``i < n`` holds item ``i``; the extra slots
    follow in the order they were handed out) and ``count [B, n]`` (replicas per item, each >= 1). With the defaults
    the result minimises the largest load per replica, ``max(weight / count)``; of equal loads per replica the lower
    index gets the replica (the heavier expert with ``heavier_ties``: finer shares of big loads). With
    ``max_count > 0`` an expert gets no more than ``max_count`` replicas while another one still can (a replica
    beyond the GPU count of the domain only doubles up on a GPU that already has one). With
    ``0 <= hot < num_slots - n`` only ``hot`` replicas go by load; the rest go one each to the lightest experts
    (small fillers instead of one more heavy replica).
    """
    batch, n = weight.shape
    extra = num_slots - n
    hot = extra if hot < 0 else min(hot, extra)
    count = torch.ones(batch, n, dtype=torch.int64)  # [B, n]
    slot2item = torch.empty(batch, num_slots, dtype=torch.int64)  # [B, S]
    slot2item[:, :n] = torch.arange(n)
    rows = torch.arange(batch)
    for k in range(hot):
        score = weight / count  # [B, n]
        if max_count > 0:
            capped = torch.where(count < max_count, score, -1.0)  # loads are >= 0, so -1 is never picked if any fits
            score = torch.where((count < max_count).any(-1, keepdim=True), capped, score)
        if heavier_ties:
            top = score == score.max(-1, keepdim=True).values  # [B, n]
            score = torch.where(top, weight, -1.0)
        pick = score.argmax(-1)  # [B]
        slot2item[:, n + k] = pick
        count[rows, pick] += 1
    if hot < extra:
        coldest = torch.sort(weight, dim=-1, stable=True).indices  # [B, n]
        picks = coldest[:, torch.arange(extra - hot) % n]  # [B, extra - hot]
        slot2item[:, n + hot :] = picks
        count.scatter_add_(-1, picks, torch.ones_like(picks))
    return slot2item, count


def greedy_pack(weight: torch.Tensor, num_bins: int, late_first: bool = False) -> torch.Tensor:
    """Pack ``n`` items into ``num_bins`` bins of ``n / num_bins`` items each: heaviest item first, onto the lightest
    bin that still has room (of equally heavy items the lower index goes first, the higher with ``late_first``).

    ``weight`` is ``[B, n]``; returns ``bin_of [B, n]``, the bin of each item.
    """
    batch, n = weight.shape
    cap = n // num_bins
    if late_first:
        order = n - 1 - torch.sort(weight.flip(-1), dim=-1, descending=True, stable=True).indices  # [B, n]
    else:
        order = torch.sort(weight, dim=-1, descending=True, stable=True).indices  # [B, n]
    loads = torch.zeros(batch, num_bins, dtype=weight.dtype)  # [B, K]
    filled = torch.zeros(batch, num_bins, dtype=torch.int64)  # [B, K]
    bin_of = torch.empty(batch, n, dtype=torch.int64)  # [B, n]
    rows = torch.arange(batch)
    inf = torch.tensor(float("inf"), dtype=weight.dtype)
    for t in range(n):
        item = order[:, t]  # [B]
        target = torch.where(filled < cap, loads, inf).argmin(-1)  # [B]
        bin_of[rows, item] = target
        loads[rows, target] += weight[rows, item]
        filled[rows, target] += 1
    return bin_of


def bin_members(bin_of: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The items of each bin, ``[B, K, n / K]``, in ascending item order (every bin must hold ``n / K`` items)."""
    batch, n = bin_of.shape
    order = torch.sort(bin_of, dim=-1, stable=True).indices  # [B, n]: items grouped by bin
    return order.view(batch, num_bins, n // num_bins)


def refine_pack(weight: torch.Tensor, bin_of: torch.Tensor, num_bins: int, max_rounds: int = 0) -> torch.Tensor:
    """Lower the heaviest bin by swapping one of its items with an item of another bin, while that helps.

    Each round, in every problem of the batch, the heaviest bin ``h`` swaps item ``a`` with item ``b`` of bin ``g``
    (``w[a] > w[b]``), the pair chosen to minimise ``max(load[h] - d, load[g] + d)`` with ``d = w[a] - w[b]``; the
    swap is made only when that is below ``load[h]``. So no bin ever exceeds the old maximum (the maximum never
    rises), the sum of squared loads falls with every swap (the search ends), and counts per bin are unchanged.
    ``weight`` and ``bin_of`` are ``[B, n]``; returns the new ``bin_of``.
    """
    batch, n = weight.shape
    cap = n // num_bins
    if num_bins < 2 or cap < 1:
        return bin_of.clone()
    members = bin_members(bin_of, num_bins).clone()  # [B, K, C]
    rows = torch.arange(batch)
    item_w = weight[rows.view(-1, 1, 1), members]  # [B, K, C]
    loads = item_w.sum(-1)  # [B, K]
    inf = torch.tensor(float("inf"), dtype=weight.dtype)
    bins = torch.arange(num_bins)
    active = torch.ones(batch, dtype=torch.bool)  # [B]: problems still improving
    rounds = max_rounds if max_rounds > 0 else 8 * n + 64
    for _ in range(rounds):
        idx = active.nonzero().squeeze(-1)  # [A]
        if idx.numel() == 0:
            break
        w_a = item_w[idx]  # [A, K, C]
        l_a = loads[idx]  # [A, K]
        heavy = l_a.argmax(-1)  # [A]
        top = l_a.gather(-1, heavy.unsqueeze(-1)).squeeze(-1)  # [A]
        mine = w_a[torch.arange(idx.numel()), heavy]  # [A, C]
        d = mine[:, :, None, None] - w_a[:, None, :, :]  # [A, C, K, C]
        new_max = torch.maximum(top[:, None, None, None] - d, l_a[:, None, :, None] + d)  # [A, C, K, C]
        bad = (d <= 0) | (bins.view(1, 1, -1, 1) == heavy.view(-1, 1, 1, 1))
        new_max = torch.where(bad, inf, new_max).flatten(1)  # [A, C*K*C]
        best, flat = new_max.min(-1)  # [A]
        ok = best < top * (1 - _REL_TOL)  # [A]
        active[idx[~ok]] = False
        if not bool(ok.any()):
            break
        idx, flat, heavy = idx[ok], flat[ok], heavy[ok]
        i = flat // (num_bins * cap)  # [S]: slot in the heavy bin
        g = (flat // cap) % num_bins  # [S]: the other bin
        j = flat % cap  # [S]: slot in the other bin
        a_item, b_item = members[idx, heavy, i].clone(), members[idx, g, j].clone()
        a_w, b_w = item_w[idx, heavy, i].clone(), item_w[idx, g, j].clone()
        members[idx, heavy, i], members[idx, g, j] = b_item, a_item
        item_w[idx, heavy, i], item_w[idx, g, j] = b_w, a_w
        loads[idx] = item_w[idx].sum(-1)  # recomputed, not updated, so rounding cannot drift
    out = torch.empty_like(bin_of)  # [B, n]
    out[rows.view(-1, 1, 1), members] = bins.view(1, -1, 1).expand_as(members)
    return out


def pack_loads(weight: torch.Tensor, bin_of: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Load of each bin, ``[B, K]``, for items ``weight [B, n]`` placed by ``bin_of [B, n]``."""
    loads = torch.zeros(weight.shape[0], num_bins, dtype=weight.dtype)
    return loads.scatter_add_(-1, bin_of, weight)
