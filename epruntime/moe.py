"""EPMoE: one DeepSeek-V3 MoE layer run expert-parallel.

router -> dispatch -> local grouped GEMM -> combine -> + shared expert.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .dispatch import make_dispatcher
from .experts import LocalExperts
from .router import Router
from .runtime import Runtime
from .shared import SharedExpert
from .timing import StageTimer
from .weights import StateDict, expert_weights, gate_weights, random_state_dict, shared_weights


class EPMoE(nn.Module):
    """An expert-parallel MoE layer holding only this rank's routed experts."""

    def __init__(
        self,
        cfg: MoEConfig,
        rt: Runtime,
        router: Router,
        experts: LocalExperts,
        shared: SharedExpert | None,
    ) -> None:
        super().__init__()
        self.cfg, self.rt = cfg, rt
        self.router, self.experts, self.shared = router, experts, shared
        self.dispatcher = make_dispatcher(rt)
        self.timer = StageTimer(rt.device)

    @classmethod
    def from_hf_state_dict(cls, cfg: MoEConfig, state_dict: StateDict, rt: Runtime) -> EPMoE:
        """Build from one layer's HF weights (names relative to ``mlp.``), keeping only this rank's experts."""
        dtype, device = cfg.torch_dtype, rt.device
        w13, w2 = expert_weights(state_dict, cfg, rt.topo.expert_range(rt.rank))
        experts = LocalExperts(cfg, w13.to(device, dtype), w2.to(device, dtype), rt.cfg.runtime.grouped_gemm)
        router = Router(cfg, *(t.to(device) for t in gate_weights(state_dict, cfg)))
        shared = None
        if cfg.n_shared_experts:
            s13, s2 = shared_weights(state_dict, cfg)
            shared = SharedExpert(s13.to(device, dtype), s2.to(device, dtype))
        return cls(cfg, rt, router, experts, shared)

    @classmethod
    def random(cls, cfg: MoEConfig, rt: Runtime, seed: int = 0) -> EPMoE:
        """Synthetic weights, identical on every rank for one seed; each rank draws only its own experts."""
        return cls.from_hf_state_dict(cfg, random_state_dict(cfg, seed, rt.topo.expert_range(rt.rank)), rt)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject activations of the wrong shape, dtype or device with a message naming the fix."""
        h, dtype = self.cfg.hidden_size, self.cfg.torch_dtype
        if x.dim() != 2 or x.shape[1] != h:
            raise ValueError(f"EPMoE input: expected x of shape [T, {h}] (model.hidden_size), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise TypeError(f"EPMoE input: expected dtype {dtype} (model.dtype), got {x.dtype}; cast x first")
        if x.device.type != self.rt.device.type:
            raise ValueError(f"EPMoE input: expected x on {self.rt.device}, got {x.device}; move x first")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H] this rank's tokens -> [T, H]
        self.check_input(x)
        timer = self.timer
        with timer.stage("total"):
            with timer.stage("router"):
                topk_idx, topk_weights = self.router(x)  # [T, K], [T, K]
            with timer.stage("dispatch"):
                result = self.dispatcher.dispatch(x, topk_idx, topk_weights)
            with timer.stage("experts"):
                y_recv = self.experts(
                    result.recv_x, result.recv_topk_idx, result.recv_topk_weights, result.tokens_per_expert
                )  # [R, H]
            with timer.stage("combine"):
                y = self.dispatcher.combine(y_recv, result.handle)  # [T, H]
            if self.shared is not None:
                with timer.stage("shared"):
                    y = y + self.shared(x)
        return y
