"""Synthetic expert loads for placement studies: Zipf over a seeded permutation of the experts, and lognormal."""

from __future__ import annotations

import torch

from epruntime.eplb.placement import _positive_int


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}; pass an integer seed")
    return torch.Generator().manual_seed(seed)


def zipf_load(num_layers: int, num_experts: int, s: float, seed: int, cap: float = 1.0) -> torch.Tensor:
    """Expected loads ``[L, E]`` float64, each row summing to 1: in every layer the expert of rank ``r`` (1-based)
    in a seeded random permutation gets a share proportional to ``r ** -s``, none above ``cap`` (the excess goes to
    the others in proportion; with top-k routing an expert takes at most ``1 / k`` of the pairs)."""
    _positive_int("num_layers", num_layers, "pass the number of MoE layers")
    _positive_int("num_experts", num_experts, "pass the number of routed experts")
    if not s >= 0:
        raise ValueError(f"s must be >= 0, got {s!r}; pass the Zipf exponent (0 is uniform, 1 is classic Zipf)")
    if not 1.0 / num_experts <= cap <= 1.0:
        raise ValueError(f"cap must be in [1/num_experts, 1], got {cap!r}; pass 1/top_k, or 1 for no cap")
    gen = _generator(seed)
    share = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-float(s))  # [E], by rank
    share = share / share.sum()
    for _ in range(num_experts):  # water-filling: each pass caps at least one more expert
        over = share > cap
        if not bool(over.any()):
            break
        spare = float((share[over] - cap).sum())
        share[over] = cap
        free = share < cap
        share[free] += spare * share[free] / share[free].sum()
    out = torch.empty(num_layers, num_experts, dtype=torch.float64)  # [L, E]
    for layer in range(num_layers):
        out[layer, torch.randperm(num_experts, generator=gen)] = share
    return out


def lognormal_load(num_layers: int, num_experts: int, sigma: float, seed: int) -> torch.Tensor:
    """Loads ``[L, E]`` float64, each row summing to 1, proportional to ``exp(sigma * N(0, 1))`` drawn per expert
    and layer from a seeded generator."""
    _positive_int("num_layers", num_layers, "pass the number of MoE layers")
    _positive_int("num_experts", num_experts, "pass the number of routed experts")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}; pass the log-space standard deviation")
    gen = _generator(seed)
    raw = torch.randn(num_layers, num_experts, generator=gen, dtype=torch.float64).mul(float(sigma)).exp()  # [L, E]
    return raw / raw.sum(-1, keepdim=True)
