"""transformers' DeepseekV3MoE built from one of our configs and state dicts: the independent
reference of the tests and the single-rank peer of ``epruntime bench``. Needs ``transformers``."""

from __future__ import annotations

import torch

from epruntime.config.schema import MoEConfig
from epruntime.io.weights import StateDict


def hf_moe_config(m: MoEConfig, experts_implementation: str = "eager"):
    """The transformers ``DeepseekV3Config`` of one MoE layer of ``m``."""
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(
        hidden_size=m.hidden_size,
        moe_intermediate_size=m.moe_intermediate_size,
        n_routed_experts=m.n_routed_experts,
        n_shared_experts=m.n_shared_experts,
        num_experts_per_tok=m.num_experts_per_tok,
        n_group=m.n_group,
        topk_group=m.topk_group,
        routed_scaling_factor=m.routed_scaling_factor,
        norm_topk_prob=m.norm_topk_prob,
        num_hidden_layers=1,
    )
    hf._experts_implementation = experts_implementation
    return hf


def fused_hf_state_dict(sd: StateDict, n_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert HF names -> transformers 5.x in-memory layout (``experts.gate_up_proj`` / ``down_proj``)."""
    out = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    out["experts.gate_up_proj"] = torch.stack(
        [torch.cat([sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"]]) for e in range(n_experts)]
    )  # [E, 2I, H]
    out["experts.down_proj"] = torch.stack([sd[f"experts.{e}.down_proj.weight"] for e in range(n_experts)])  # [E, H, I]
    return out


def hf_moe(m: MoEConfig, sd: StateDict, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"):
    """transformers' ``DeepseekV3MoE`` holding the weights ``sd`` (per-expert HF names), in ``dtype``."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    module = DeepseekV3MoE(hf_moe_config(m, experts_implementation)).eval()
    module.load_state_dict({k: v.float() for k, v in fused_hf_state_dict(sd, m.n_routed_experts).items()})
    module.to(dtype)
    module.gate.float()  # the router stays fp32, as in DeepSeek-V3
    return module
