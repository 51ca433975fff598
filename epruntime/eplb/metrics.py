"""Per-GPU load of a placement and its balance (max over mean), under the model where an expert's load is split
evenly over its replicas."""

from __future__ import annotations

import torch


def check_placement(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> None:
    """Raise ValueError unless ``weight [L, E]``, ``phy2log [L, P]`` and ``logcnt [L, E]`` describe one placement
    over ``num_gpus`` GPUs."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}; pass one row per layer")
    if phy2log.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError(f"phy2log must be [layers, slots] with {weight.shape[0]} layers, got {tuple(phy2log.shape)}")
    if logcnt.shape != weight.shape:
        raise ValueError(f"logcnt must have weight's shape {tuple(weight.shape)}, got {tuple(logcnt.shape)}")
    if not isinstance(num_gpus, int) or num_gpus < 1 or phy2log.shape[1] % num_gpus:
        raise ValueError(f"num_gpus must be a positive divisor of the slot count {phy2log.shape[1]}, got {num_gpus}")
    if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= weight.shape[1]):
        raise ValueError(f"phy2log must hold logical expert ids in [0, {weight.shape[1]}); fix the placement")
    if bool((logcnt < 1).any()):
        raise ValueError("logcnt must be >= 1 for every expert; every logical expert needs a replica")


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load of each GPU, ``[L, G]`` float64: slot ``p`` (on GPU ``p // (P / G)``) carries ``weight / logcnt`` of its
    logical expert."""
    check_placement(weight, phy2log, logcnt, num_gpus)
    w = weight.detach().cpu().to(torch.float64)  # [L, E]
    per_replica = w / logcnt.cpu().to(torch.float64)  # [L, E]
    slot_load = per_replica.gather(-1, phy2log.cpu().long())  # [L, P]
    return slot_load.view(w.shape[0], num_gpus, -1).sum(-1)  # [L, G]


def balance(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max over mean of the per-GPU load, ``[L]`` float64 (1.0 is perfect; a layer with no load counts as 1.0)."""
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)  # [L, G]
    mean = loads.mean(-1)  # [L]
    peak = loads.max(-1).values  # [L]
    return torch.where(mean > 0, peak / mean.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(mean))
