"""EPMoE: one DeepSeek-V3 MoE layer run expert-parallel.

router -> dispatch -> local grouped GEMM -> combine -> + shared expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from epruntime.cli.instruments import StageTimer
from epruntime.config.schema import MoEConfig
from epruntime.dispatch import make_dispatcher
from epruntime.io.weights import StateDict, expert_weights, gate_weights, random_state_dict, shared_weights
from epruntime.layer.experts import LocalExperts
from epruntime.layer.router import Router
from epruntime.layer.shared import SharedExpert
from epruntime.layer.side_stream import SideStream
from epruntime.parallel import health
from epruntime.parallel.expert_tp import expert_parallel, tp_slice, tp_slice_gate_up
from epruntime.parallel.runtime import Runtime

if TYPE_CHECKING:
    from epruntime.io.checkpoint import CheckpointReader


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
        self.parallel = expert_parallel(rt)
        self.dispatcher = make_dispatcher(self.parallel.ep)
        self.shared_mode = rt.cfg.runtime.shared_expert
        self.shared_sharded = rt.cfg.runtime.shared_expert_tp > 1  # its partial output joins the TP all-reduce
        self.side = SideStream(rt.device)
        self.timer = StageTimer(rt.device)
        self.check_finite = rt.cfg.runtime.check_finite
        self.layer_idx: int | None = None  # the model layer this MoE is, named in failure messages

    @property
    def label(self) -> str:
        return "moe layer" if self.layer_idx is None else f"layer {self.layer_idx}"

    @classmethod
    def from_hf_state_dict(cls, cfg: MoEConfig, state_dict: StateDict, rt: Runtime) -> EPMoE:
        """Build from one layer's HF weights (names relative to ``mlp.``), keeping only this rank's experts."""
        dtype, device = cfg.torch_dtype, rt.device
        par = expert_parallel(rt)
        tp_rank, tp_size = par.tp_rank, par.tp_size
        w13, w2 = expert_weights(state_dict, cfg, par.ep.topo.expert_range(par.ep.rank))  # [E_l, 2I, H], [E_l, H, I]
        w13, w2 = tp_slice_gate_up(w13, tp_rank, tp_size), tp_slice(w2, -1, tp_rank, tp_size)  # this rank's slice
        experts = LocalExperts(cfg, w13.to(device, dtype), w2.to(device, dtype), rt.cfg.runtime.grouped_gemm)
        gate, bias = gate_weights(state_dict, cfg)
        router = Router(cfg, gate.to(device), bias.to(device), rt.topo.experts_per_node)
        shared = None
        if cfg.n_shared_experts:
            s13, s2 = shared_weights(state_dict, cfg)  # [2I_s, H], [H, I_s]
            if rt.cfg.runtime.shared_expert_tp > 1:
                s13, s2 = tp_slice_gate_up(s13, tp_rank, tp_size), tp_slice(s2, -1, tp_rank, tp_size)
            shared = SharedExpert(s13.to(device, dtype), s2.to(device, dtype))
        return cls(cfg, rt, router, experts, shared)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | CheckpointReader, layer_idx: int, rt: Runtime) -> EPMoE:
        """MoE layer ``layer_idx`` of a HF DeepSeek-V3 checkpoint directory (or open reader); reads only this
        rank's experts, its gate and shared expert (see :mod:`epruntime.checkpoint`)."""
        from epruntime.io.checkpoint import as_reader  # safetensors is needed only to read checkpoints

        layer = cls.from_hf_state_dict(rt.cfg.model, as_reader(checkpoint).moe_layer(layer_idx, rt.cfg.model), rt)
        layer.layer_idx = layer_idx
        return layer

    @classmethod
    def random(cls, cfg: MoEConfig, rt: Runtime, seed: int = 0) -> EPMoE:
        """Synthetic weights, identical on every rank for one seed; each rank draws only its own experts."""
        ep = expert_parallel(rt).ep
        return cls.from_hf_state_dict(cfg, random_state_dict(cfg, seed, ep.topo.expert_range(ep.rank)), rt)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject activations of the wrong shape, dtype or device with a message naming the fix."""
        h, dtype = self.cfg.hidden_size, self.cfg.torch_dtype
        if x.dim() != 2 or x.shape[1] != h:
            raise ValueError(f"EPMoE input: expected x of shape [T, {h}] (model.hidden_size), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise TypeError(f"EPMoE input: expected dtype {dtype} (model.dtype), got {x.dtype}; cast x first")
        if x.device.type != self.rt.device.type:
            raise ValueError(f"EPMoE input: expected x on {self.rt.device}, got {x.device}; move x first")

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared is None:
            return None
        with self.timer.stage("shared"):
            return self.side.launch(lambda: self.shared(x))  # [T, H]

    def _routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple:
        """Dispatch, local experts and combine; in overlap mode the shared expert runs while dispatch is in flight."""
        timer, shared_out = self.timer, None
        with timer.stage("dispatch"):
            inflight = self.dispatcher.dispatch_a(x, topk_idx, topk_weights)
        if self.shared_mode == "overlap":
            shared_out = self._shared(x)
        with timer.stage("dispatch"):
            result = self.dispatcher.dispatch_b(inflight)
        with timer.stage("experts"):
            y_recv = self.experts.run(result)  # [R, H]; [E_local, C, H] for a low-latency (masked) result
        with timer.stage("combine"):
            y = self.dispatcher.combine_b(self.dispatcher.combine_a(y_recv, result.handle))  # [T, H]
        return y, shared_out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H] this rank's tokens -> [T, H]
        """The layer on this rank's tokens. A failed collective raises :class:`RankFailure` naming the stage
        and the rank that failed; this rank's own errors are posted for its peers before they propagate."""
        with health.stage(self.label):
            try:
                self.check_input(x)
                if self.check_finite:
                    self._assert_finite(x, "input")
                y = self._pipeline(x)
                if self.check_finite:
                    self._assert_finite(y, "output")
                return y
            except health.RankFailure:
                raise
            except Exception as exc:
                if health.is_collective_failure(exc):
                    raise health.RankFailure(health.describe_failure(exc)) from exc
                health.report_own_failure(exc)
                raise

    def _assert_finite(self, t: torch.Tensor, what: str) -> None:
        health.assert_finite_on_all_ranks(t, f"{self.label} {what}", self.rt.world_group, self.rt.world_size)

    def _pipeline(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        with self.timer.forward():
            with self.timer.stage("router"):
                topk_idx, topk_weights = self.router(x)  # [T, K], [T, K]
            shared_out = self._shared(x) if self.shared_mode == "serial" else None
            # Everything the routed path allocated is released when _routed returns, before a deferred
            # shared expert allocates its activations.
            y, overlapped = self._routed(x, topk_idx, topk_weights)
            shared_out = overlapped if overlapped is not None else shared_out
            if self.shared_mode == "defer":
                shared_out = self._shared(x)
            if shared_out is not None:
                self.side.join()
            if shared_out is not None and self.shared_sharded:
                y += shared_out  # a shard's partial output: summed by the TP all-reduce below
            if self.parallel.tp_group is not None:
                with self.timer.stage("combine"):
                    dist.all_reduce(y, group=self.parallel.tp_group)  # sum the intermediate slices
            if shared_out is not None and not self.shared_sharded:
                y += shared_out  # replicated (TP1) output: added once, after the all-reduce
        return y
