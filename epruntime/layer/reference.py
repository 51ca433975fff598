"""Single-process reference MoE layer: every expert in one process, no dispatch, no grouped GEMM.

Deliberately plain (a loop over experts with boolean masks) so that it shares nothing with the
expert-parallel path but the router; tests check the router separately against transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epruntime.config.schema import MoEConfig
from epruntime.io.weights import StateDict, gate_weights, take
from epruntime.layer.router import route


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _expert(sd: StateDict, cfg: MoEConfig, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    if "experts.gate_up_proj" in sd:
        gate, up = sd["experts.gate_up_proj"][e].split(i)
        return gate, up, sd["experts.down_proj"][e]
    return (
        take(sd, f"experts.{e}.gate_proj.weight", (i, h)),
        take(sd, f"experts.{e}.up_proj.weight", (i, h)),
        take(sd, f"experts.{e}.down_proj.weight", (h, i)),
    )


@torch.no_grad()
def reference_moe(x: torch.Tensor, sd: StateDict, cfg: MoEConfig, experts_per_node: int | None = None) -> torch.Tensor:
    """``y = sum_k w_k Expert_{idx_k}(x) + Shared(x)`` for all tokens ``x [T, H]``, computed in fp32.

    ``experts_per_node`` is the placement's, needed only for node-limited routing.
    """
    xf = x.float()  # [T, H]
    topk_idx, topk_weights = route(xf, *gate_weights(sd, cfg), cfg, experts_per_node)  # [T, K], [T, K]
    y = torch.zeros_like(xf)  # [T, H]
    for e in torch.unique(topk_idx).tolist():
        hit = topk_idx == e  # [T, K]
        tokens = hit.any(dim=1)  # [T]
        weight = (topk_weights * hit).sum(dim=1)[tokens]  # [T_e]
        gate, up, down = (w.float() for w in _expert(sd, cfg, e))
        y[tokens] += weight.unsqueeze(1) * _swiglu(xf[tokens], gate, up, down)
    if cfg.n_shared_experts:
        y += _swiglu(xf, *(sd[f"shared_experts.{p}_proj.weight"].float() for p in ("gate", "up", "down")))
    return y
