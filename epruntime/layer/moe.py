"""EPMoE: one DeepSeek-V3 MoE layer run expert-parallel.

router -> dispatch -> local grouped GEMM -> combine -> + shared expert. The forward is the plain
pipeline: timing and stage marks come from an opt-in :class:`~epruntime.layer.probe.Probe`
(``layer.probe``), finite checks from forward hooks (``runtime.check_finite``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from epruntime.config.schema import MoEConfig
from epruntime.dispatch.base import DispatchSpec
from epruntime.dispatch.registry import make_dispatcher
from epruntime.io.weights import StateDict, expert_weights, gate_weights, random_state_dict, shared_weights
from epruntime.layer.experts import LocalExperts
from epruntime.layer.probe import PLAIN, Probe
from epruntime.layer.router import Router
from epruntime.layer.shared import SharedExpert
from epruntime.layer.side_stream import SideStream
from epruntime.parallel import health
from epruntime.parallel.expert_tp import tp_slice, tp_slice_gate_up
from epruntime.parallel.runtime import Runtime

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.utils.hooks import RemovableHandle

    from epruntime.io.checkpoint import CheckpointReader


def dispatch_spec(cfg: MoEConfig, capacity: int) -> DispatchSpec:
    """What a dispatcher of this layer needs to know: row width and dtype, routed experts, capacity."""
    return DispatchSpec(cfg.hidden_size, cfg.torch_dtype, cfg.n_routed_experts, capacity)


class EPMoE(nn.Module):
    """An expert-parallel MoE layer holding only this rank's routed experts.

    ``shared_mode`` (``runtime.shared_expert``): ``serial`` runs the shared expert first, ``overlap`` while
    the dispatch is in flight, ``defer`` after the routed path has released its buffers. With expert TP
    (``runtime.moe_tp``) one all-reduce over the TP group sums the intermediate slices; a replicated (TP1)
    shared expert is added after it, a sharded one before.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        rt: Runtime,
        router: Router,
        experts: LocalExperts,
        shared: SharedExpert | None,
    ) -> None:
        super().__init__()
        run = rt.cfg.runtime  # read once, here: nothing below the layer sees the config
        self.cfg, self.device, self.tp = cfg, rt.device, rt.layout.tp
        self.router, self.experts, self.shared = router, experts, shared
        self.dispatcher = make_dispatcher(run.dispatcher, rt.layout.ep, dispatch_spec(cfg, run.max_tokens_per_rank))
        self.shared_mode = run.shared_expert
        self.shared_sharded = run.shared_expert_tp > 1  # its partial output joins the TP all-reduce
        self.side = SideStream(rt.device)
        self.probe: Probe = PLAIN
        self.layer_idx: int | None = None  # the model layer this MoE is, named in failure messages
        self._finite_group, self._finite_hooks = rt.world_group, []
        self.set_finite_check(run.check_finite)

    @property
    def label(self) -> str:
        return "moe layer" if self.layer_idx is None else f"layer {self.layer_idx}"

    @classmethod
    def from_hf_state_dict(cls, cfg: MoEConfig, state_dict: StateDict, rt: Runtime) -> EPMoE:
        """Build from one layer's HF weights (names relative to ``mlp.``), keeping only this rank's experts."""
        dtype, device, ep, tp = cfg.torch_dtype, rt.device, rt.layout.ep, rt.layout.tp
        w13, w2 = expert_weights(state_dict, cfg, ep.topo.expert_range(ep.rank))  # [E_l, 2I, H], [E_l, H, I]
        w13, w2 = tp_slice_gate_up(w13, tp.rank, tp.size), tp_slice(w2, -1, tp.rank, tp.size)  # this rank's slice
        experts = LocalExperts(cfg, w13.to(device, dtype), w2.to(device, dtype), rt.cfg.runtime.grouped_gemm)
        gate, bias = gate_weights(state_dict, cfg)
        router = Router(cfg, gate.to(device), bias.to(device), rt.topo.experts_per_node)
        shared = None
        if cfg.n_shared_experts:
            s13, s2 = shared_weights(state_dict, cfg)  # [2I_s, H], [H, I_s]
            if rt.cfg.runtime.shared_expert_tp > 1:
                s13, s2 = tp_slice_gate_up(s13, tp.rank, tp.size), tp_slice(s2, -1, tp.rank, tp.size)
            shared = SharedExpert(s13.to(device, dtype), s2.to(device, dtype))
        return cls(cfg, rt, router, experts, shared)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | CheckpointReader, layer_idx: int, rt: Runtime) -> EPMoE:
        """MoE layer ``layer_idx`` of a HF DeepSeek-V3 checkpoint directory (or open reader); reads only this
        rank's experts, its gate and shared expert (see :mod:`epruntime.io.checkpoint`)."""
        from epruntime.io.checkpoint import as_reader  # safetensors is needed only to read checkpoints

        layer = cls.from_hf_state_dict(rt.cfg.model, as_reader(checkpoint).moe_layer(layer_idx, rt.cfg.model), rt)
        layer.layer_idx = layer_idx
        return layer

    @classmethod
    def random(cls, cfg: MoEConfig, rt: Runtime, seed: int = 0) -> EPMoE:
        """Synthetic weights, identical on every rank for one seed; each rank draws only its own experts."""
        ep = rt.layout.ep
        return cls.from_hf_state_dict(cfg, random_state_dict(cfg, seed, ep.topo.expert_range(ep.rank)), rt)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject activations of the wrong shape, dtype or device with a message naming the fix."""
        h, dtype = self.cfg.hidden_size, self.cfg.torch_dtype
        if x.dim() != 2 or x.shape[1] != h:
            raise ValueError(f"EPMoE input: expected x of shape [T, {h}] (model.hidden_size), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise TypeError(f"EPMoE input: expected dtype {dtype} (model.dtype), got {x.dtype}; cast x first")
        if x.device.type != self.device.type:
            raise ValueError(f"EPMoE input: expected x on {self.device}, got {x.device}; move x first")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H] this rank's tokens -> [T, H]
        """The layer on this rank's tokens. A failed collective raises :class:`~epruntime.parallel.health.RankFailure`
        naming the rank that failed; this rank's own errors are posted for its peers before they propagate."""
        probe, dispatcher = self.probe, self.dispatcher
        with health.failures_named(), probe.layer(self.label):
            self.check_input(x)
            if self.tp.group is not None:
                health.check_tp_tokens(x.shape[0], self.tp.group, self.tp.size)
            with probe.stage("router"):
                topk_idx, topk_weights = self.router(x)  # [T, K], [T, K]
            shared = self._shared(x) if self.shared_mode == "serial" else None
            with probe.stage("dispatch"):
                inflight = dispatcher.dispatch_a(x, topk_idx, topk_weights)
            if self.shared_mode == "overlap":
                shared = self._shared(x)  # computes while the dispatch's last collective is in flight
            with probe.stage("dispatch"):
                received = dispatcher.dispatch_b(inflight)
            with probe.stage("experts"):
                y_recv = self.experts.run(received)  # [R, H]; [E_local, C, H] for a masked (low-latency) result
            with probe.stage("combine"):
                y = dispatcher.combine_b(dispatcher.combine_a(y_recv, received.handle))  # [T, H]
            del inflight, received, y_recv  # the routed path's buffers go before a deferred shared expert
            if self.shared_mode == "defer":
                shared = self._shared(x)
            return self._add_shared(y, shared)

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:  # [T, H] -> [T, H], on the side stream on GPU
        if self.shared is None:
            return None

        def run() -> torch.Tensor:
            with self.probe.stage("shared"):  # entered on the stream the work runs on
                return self.shared(x)

        return self.side.launch(run)

    def _add_shared(self, y: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:  # [T, H] -> [T, H]
        """Join the shared expert's output: a TP shard's before the TP all-reduce, a replicated one after it."""
        if shared is not None:
            self.side.join()
            if self.shared_sharded:
                y += shared  # a shard's partial output: summed by the TP all-reduce below
        if self.tp.group is not None:
            with self.probe.stage("combine"):
                dist.all_reduce(y, group=self.tp.group)  # sum the intermediate slices
        if shared is not None and not self.shared_sharded:
            y += shared  # replicated (TP1) output: added once, after the all-reduce
        return y

    def set_finite_check(self, on: bool) -> None:
        """Check every input and output for NaN/Inf on all ranks at once (forward hooks; one all-gather each)."""
        for handle in self._finite_hooks:
            handle.remove()
        self._finite_hooks: list[RemovableHandle] = health.finite_check_hooks(self, self._finite_group) if on else []

    @property
    def checks_finite(self) -> bool:
        return bool(self._finite_hooks)

    @contextmanager
    def uninstrumented(self) -> Iterator[None]:
        """The plain layer inside the block (no probe, no finite check): for warm-ups and CUDA-graph capture."""
        probe, finite = self.probe, self.checks_finite
        self.probe = PLAIN
        self.set_finite_check(False)
        try:
            yield
        finally:
            self.probe = probe
            self.set_finite_check(finite)
