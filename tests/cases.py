"""Inputs of the MoE layer shared by the tests that run it on real worlds and compare with a reference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from epruntime.config.schema import MoEConfig
from epruntime.layer.hf_peer import fused_hf_state_dict
from epruntime.layer.moe import EPMoE
from epruntime.parallel.runtime import Runtime


@dataclass
class LayerCase:
    """One input of the layer: its per-expert weights, every rank's tokens, and how the layer is built.

    ``model`` overrides fields of the config's model (node-limited routing, say); ``fused`` loads the
    weights in transformers' fused form (``gate_up_proj``) instead of one tensor per expert.
    """

    name: str
    sd: dict[str, torch.Tensor]
    xs: list[torch.Tensor]  # [T_r, H] per rank
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    fused: bool = False

    def model_config(self, model: MoEConfig) -> MoEConfig:
        """``model`` with this case's overrides."""
        return dataclasses.replace(model, **self.model)

    def layer(self, rt: Runtime) -> EPMoE:
        """This rank's layer, loaded from the case's weights in the case's state-dict form."""
        model = self.model_config(rt.cfg.model)
        sd = fused_hf_state_dict(self.sd, model.n_routed_experts) if self.fused else self.sd
        return EPMoE.from_hf_state_dict(model, sd, rt)

    def x_all(self) -> torch.Tensor:
        """Every rank's tokens in rank order [T_all, H]: the input of the one-process references."""
        return torch.cat(self.xs)
