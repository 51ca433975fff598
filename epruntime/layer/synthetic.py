"""Synthetic layer weights for runs and benchmarks, optionally with skewed routing (``runtime.routing_skew``).

With skew ``s > 0`` the gate's correction bias (which steers the choice of experts, not their weights)
is fitted so that expert popularity follows Zipf(s) over a seeded permutation of the experts: the
expert of popularity rank ``r`` gets a share of the (token, expert) pairs proportional to
``1 / (r + 1)^s``. No expert can take more than ``1 / K`` of the pairs (one per token), so shares above
that are capped and the rest spread by the same law. The fit routes a fixed, seeded sample of tokens
with the model's own router and is deterministic, so every rank (and the reference) gets the same bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from epruntime.config.schema import MoEConfig
from epruntime.eplb.loads import zipf_load
from epruntime.io.weights import random_state_dict
from epruntime.layer.router import route

FIT_TOKENS = 2048
FIT_ROUNDS = 60


def skewed_correction_bias(gate: torch.Tensor, cfg: MoEConfig, s: float, seed: int) -> torch.Tensor:  # [E] fp32
    """A correction bias under which ``route`` gives the experts Zipf(s) shares of the pairs (see module doc)."""
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    target = zipf_load(1, e, s, seed, cap=1.0 / k)[0]  # [E] shares summing to 1
    x = torch.randn(FIT_TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))  # [N, H]
    bias = torch.zeros(e)
    step = 0.5 * float(gate.float().norm(dim=1).mean()) / cfg.hidden_size**0.5  # the scores' spread
    fit = dataclasses.replace(cfg, max_nodes_per_token=None)  # the fit needs no topology: node limits left out
    for _ in range(FIT_ROUNDS):
        idx, _ = route(x, gate, bias, fit)  # [N, K]
        share = torch.bincount(idx.reshape(-1), minlength=e).double() / idx.numel()  # [E]
        bias += (step * torch.log((target + 1e-6) / (share + 1e-6))).float().clamp(-step, step)
    return bias


def synthetic_state_dict(
    cfg: MoEConfig, seed: int, experts: Iterable[int] | None = None, routing_skew: float = 0.0
) -> dict[str, torch.Tensor]:
    """:func:`~epruntime.io.weights.random_state_dict` of ``experts``; with a positive ``routing_skew`` its
    correction bias is fitted to Zipf(``routing_skew``) popularity."""
    sd = random_state_dict(cfg, seed, experts)
    if routing_skew > 0:
        sd["gate.e_score_correction_bias"] = skewed_correction_bias(sd["gate.weight"], cfg, routing_skew, seed)
    return sd
