"""Small configs, transformers reference modules and inputs shared by the tests."""

from __future__ import annotations

import os
from typing import Any

import torch

from epruntime.config.schema import Config, config_from_dict
from epruntime.dispatch.base import Dispatcher
from epruntime.dispatch.registry import make_dispatcher
from epruntime.io.weights import random_state_dict
from epruntime.layer.hf_peer import hf_moe as hf_moe_module
from epruntime.layer.hf_peer import hf_moe_config
from epruntime.layer.moe import dispatch_spec
from epruntime.parallel.runtime import Runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_MODEL = dict(
    hidden_size=64,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    scoring_func="sigmoid",
    dtype="float32",
)


def make_config(
    nnodes: int = 1, ranks_per_node: int = 1, runtime: dict[str, Any] | None = None, **model: Any
) -> Config:
    """A validated CPU/gloo config with the small model, overridden by ``model`` keys."""
    return config_from_dict(
        {
            "model": {**SMALL_MODEL, **model},
            "topology": {"nnodes": nnodes, "ranks_per_node": ranks_per_node, "device": "cpu", "backend": "gloo"},
            "runtime": {"timeout_s": 60, **(runtime or {})},
        }
    )


def gpu_config(world: int, dispatcher: str, capacity: int) -> Config:
    """A one-node CUDA/NCCL config (bf16, hidden 2048, as DeepEP's kernels want) for the GPU tests."""
    return config_from_dict(
        {
            "model": dict(
                hidden_size=2048,
                moe_intermediate_size=256,
                n_routed_experts=16,
                num_experts_per_tok=4,
                n_group=4,
                topk_group=2,
                dtype="bfloat16",
            ),
            "topology": {"nnodes": 1, "ranks_per_node": world, "device": "cuda", "backend": "nccl"},
            "runtime": {"dispatcher": dispatcher, "max_tokens_per_rank": capacity, "tokens_per_rank": capacity},
        }
    )


def hf_config(cfg: Config):
    """The transformers DeepseekV3Config of ``cfg.model`` (one layer, eager experts)."""
    return hf_moe_config(cfg.model)


def hf_moe(cfg: Config, sd: dict[str, torch.Tensor]):
    """transformers' DeepseekV3MoE loaded with the per-expert state dict ``sd`` (fp32)."""
    return hf_moe_module(cfg.model, sd)


def layer_weights(cfg: Config, seed: int, bias_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random per-expert weights; ``bias_scale`` makes the correction biases larger (more negatives)."""
    sd = random_state_dict(cfg.model, seed)
    sd["gate.e_score_correction_bias"] = sd["gate.e_score_correction_bias"] * bias_scale
    return sd


def tokens(num: int, hidden: int, seed: int) -> torch.Tensor:
    """Fresh random activations ``[num, hidden]`` in fp32."""
    return torch.randn(num, hidden, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ``max|a - b| / max|b|``."""
    if b.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def dispatcher_for(rt: Runtime, name: str) -> Dispatcher:
    """Dispatcher ``name`` on ``rt``'s EP world, with the spec of ``rt.cfg``'s layer."""
    spec = dispatch_spec(rt.cfg.model, rt.cfg.runtime.max_tokens_per_rank, rt.topo.num_experts)
    return make_dispatcher(name, rt.layout.ep, spec)
