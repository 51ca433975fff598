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

from epruntime.config.schema import MoEConfig, RuntimeConfig
from epruntime.dispatch.base import DispatchSpec
from epruntime.dispatch.registry import MASKED, NORMAL, PER_CALL, backend, make_dispatcher
from epruntime.io.weights import StateDict, expert_weights, gate_weights, shared_weights
from epruntime.layer.experts import LocalExperts
from epruntime.layer.load import ExpertLoad
from epruntime.layer.probe import PLAIN, Probe
from epruntime.layer.rebalance import attach_rebalancer
from epruntime.layer.router import Router
from epruntime.layer.shared import SharedExpert
from epruntime.layer.side_stream import SideStream
from epruntime.layer.synthetic import synthetic_state_dict
from epruntime.layer.tensor_parallel import tp_slice, tp_slice_gate_up
from epruntime.parallel import health
from epruntime.parallel.placement import ExpertPlacement
from epruntime.parallel.runtime import Runtime

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.utils.hooks import RemovableHandle

    from epruntime.io.checkpoint import CheckpointReader


def dispatch_spec(cfg: MoEConfig, capacity: int, num_slots: int | None = None) -> DispatchSpec:
    """What a dispatcher of this layer needs to know: row width and dtype, physical expert slots (default:
    one per routed expert), capacity."""
    return DispatchSpec(cfg.hidden_size, cfg.torch_dtype, num_slots or cfg.n_routed_experts, capacity)


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
        placement: ExpertPlacement | None = None,
    ) -> None:
        super().__init__()
        run = rt.cfg.runtime  # read once, here: nothing below the layer sees the config
        self.cfg, self.device, self.tp, self.ep_rank = cfg, rt.device, rt.layout.tp, rt.layout.ep.rank
        self.router, self.experts, self.shared = router, experts, shared
        self.placement = (placement or rt.layout.placement()).to(rt.device)  # which logical expert each slot holds
        self.remap = not self.placement.is_identity  # the router's logical ids are not the slots
        spec = dispatch_spec(cfg, run.max_tokens_per_rank, self.placement.num_slots)
        fp8 = run.grouped_gemm == "deep_gemm"  # DeepEP's low-latency dispatch then sends FP8, as the GEMM wants
        self.dispatcher = make_dispatcher(run.dispatcher, rt.layout.ep, spec, num_sms=run.deepep_num_sms, use_fp8=fp8)
        if rt.device.type == "cuda":  # compile DeepGEMM's kernels now, not between a dispatch and its combine
            self.experts.warm_up(*self._warm_up_rows(run, rt.layout.ep.world_size))
        self.load = ExpertLoad(cfg.n_routed_experts, rt.device)
        self.rebalancer = None  # epruntime.layer.rebalance: moves experts between forwards (runtime.rebalance_every)
        self.shared_mode = run.shared_expert
        # overlap runs the shared expert on a side stream, except beside a receive hook (DeepEP low latency), which
        # occupies no SMs between send and hook: there it goes between them, on the same stream, as DeepEP intends
        self.overlap_on_side = not backend(run.dispatcher).recv_hook
        self.micro_batches = run.micro_batches  # chunks the tokens are pipelined in (runtime.micro_batches)
        self.shared_sharded = run.shared_expert_tp > 1  # its partial output joins the TP all-reduce
        self.side = SideStream(rt.device)
        self.probe: Probe = PLAIN
        self.layer_idx: int | None = None  # the model layer this MoE is, named in failure messages
        self._finite_group, self._finite_hooks = rt.world_group, []
        self.set_finite_check(run.check_finite)
        if run.rebalance_every:
            attach_rebalancer(self, rt)

    def _warm_up_rows(self, run: RuntimeConfig, ep_world: int) -> tuple[int, int]:
        """(normal-layout rows, masked capacity) the expert stage will see with this dispatcher (0: never)."""
        layout = backend(run.dispatcher).layout
        normal = run.tokens_per_rank * self.cfg.num_experts_per_tok if layout in (NORMAL, PER_CALL) else 0
        masked = run.max_tokens_per_rank * ep_world if layout in (MASKED, PER_CALL) else 0
        return normal, masked

    @property
    def label(self) -> str:
        return "moe layer" if self.layer_idx is None else f"layer {self.layer_idx}"

    @classmethod
    def from_hf_state_dict(
        cls,
        cfg: MoEConfig,
        state_dict: StateDict,
        rt: Runtime,
        moe_layer: int = 0,
        placement: ExpertPlacement | None = None,
    ) -> EPMoE:
        """Build from one layer's HF weights (names relative to ``mlp.``), keeping only the experts of this rank's
        slots: those of ``placement``, by default row ``moe_layer`` (in model order) of ``runtime.placement``."""
        dtype, device, ep, tp = cfg.torch_dtype, rt.device, rt.layout.ep, rt.layout.tp
        placement = placement or rt.layout.placement(moe_layer)
        w13, w2 = expert_weights(state_dict, cfg, placement.experts_of(ep.rank))  # [S_l, 2I, H], [S_l, H, I]
        w13, w2 = tp_slice_gate_up(w13, tp.rank, tp.size), tp_slice(w2, -1, tp.rank, tp.size)  # this rank's slice
        experts = LocalExperts(cfg, w13.to(device, dtype), w2.to(device, dtype), rt.cfg.runtime.grouped_gemm)
        gate, bias = gate_weights(state_dict, cfg)
        router = Router(cfg, gate.to(device), bias.to(device), cfg.n_routed_experts // rt.topo.nnodes)
        shared = None
        if cfg.n_shared_experts:
            s13, s2 = shared_weights(state_dict, cfg)  # [2I_s, H], [H, I_s]
            if rt.cfg.runtime.shared_expert_tp > 1:
                s13, s2 = tp_slice_gate_up(s13, tp.rank, tp.size), tp_slice(s2, -1, tp.rank, tp.size)
            shared = SharedExpert(s13.to(device, dtype), s2.to(device, dtype))
        return cls(cfg, rt, router, experts, shared, placement)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | CheckpointReader, layer_idx: int, rt: Runtime) -> EPMoE:
        """MoE layer ``layer_idx`` of a HF DeepSeek-V3 checkpoint directory (or open reader); reads only this
        rank's experts, its gate and shared expert (see :mod:`epruntime.io.checkpoint`)."""
        from epruntime.io.checkpoint import as_reader  # safetensors is needed only to read checkpoints

        reader = as_reader(checkpoint)
        ordinal = sum(reader.is_moe_layer(i) for i in range(layer_idx))  # this MoE layer's row of the placement
        layer = cls.from_hf_state_dict(rt.cfg.model, reader.moe_layer(layer_idx, rt.cfg.model), rt, ordinal)
        layer.layer_idx = layer_idx
        return layer

    @classmethod
    def random(cls, cfg: MoEConfig, rt: Runtime, seed: int = 0, placement: ExpertPlacement | None = None) -> EPMoE:
        """Synthetic weights, identical on every rank for one seed; each rank draws only the experts of its slots
        (of ``placement``, by default ``runtime.placement``'s). With ``runtime.routing_skew`` the gate's correction
        bias makes expert popularity follow Zipf."""
        placement = placement or rt.layout.placement()
        sd = synthetic_state_dict(cfg, seed, set(placement.experts_of(rt.layout.ep.rank)), rt.cfg.runtime.routing_skew)
        return cls.from_hf_state_dict(cfg, sd, rt, placement=placement)

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
        probe = self.probe
        with health.failures_named(), probe.layer(self.label):
            self.check_input(x)
            if self.tp.group is not None:
                health.check_tp_tokens(x.shape[0], self.tp.group, self.tp.size)
            with probe.stage("router"):
                topk_idx, topk_weights = self.router(x)  # [T, K] logical experts, [T, K]
                self.load.count_routes(topk_idx)
                slots = self.placement.choose(topk_idx, self.ep_rank) if self.remap else topk_idx  # [T, K] slots
            shared = self._shared(x) if self.shared_mode == "serial" else None
            # dispatch -> experts -> combine; in overlap mode the shared expert runs in the first dispatch's gap
            y, overlapped = self._routed(x, slots, topk_weights)  # [T, H]; its buffers are gone on return
            if self.shared_mode == "defer":
                shared = self._shared(x)
            return self._add_shared(y, overlapped if overlapped is not None else shared)

    def _routed(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # [T, H], [T, K], [T, K] -> [T, H], shared [T, H] or None
        """Dispatch, experts and combine, software-pipelined over ``micro_batches`` chunks of the tokens: chunk
        i+1's dispatch and chunk i-1's combine are in flight while chunk i's experts run (one chunk: the plain
        sequence). In ``overlap`` mode the shared expert runs while the first dispatch is in flight."""
        probe, dispatcher = self.probe, self.dispatcher
        chunks = list(zip(*(t.tensor_split(self.micro_batches) for t in (x, slots, weights)), strict=True))
        with probe.stage("dispatch"):
            pending = dispatcher.dispatch_a(*chunks[0])
        shared = self._shared(x) if self.shared_mode == "overlap" else None
        outs, combining = [], None
        for i in range(len(chunks)):
            with probe.stage("dispatch"):
                received = dispatcher.dispatch_b(pending)
                if i + 1 < len(chunks):
                    pending = dispatcher.dispatch_a(*chunks[i + 1])  # in flight while chunk i's experts run
            with probe.stage("experts"):
                self.load.count_received(received)
                y_recv = self.experts.run(received)  # [R, H]; [S_local, C, H] for a masked (low-latency) result
            with probe.stage("combine"):
                issued = dispatcher.combine_a(y_recv, received.handle)  # in flight while chunk i+1's experts run
                if combining is not None:
                    outs.append(dispatcher.combine_b(combining))  # [T_i-1, H]
                combining = issued
            del received, y_recv
        with probe.stage("combine"):
            outs.append(dispatcher.combine_b(combining))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), shared

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:  # [T, H] -> [T, H]
        """The shared expert: on the side stream (GPU) when it overlaps the dispatch, else in stream order."""
        if self.shared is None:
            return None

        def run() -> torch.Tensor:
            with self.probe.stage("shared"):  # entered on the stream the work runs on
                return self.shared(x)

        if self.shared_mode == "overlap" and self.overlap_on_side:
            return self.side.launch(run)
        return run()

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
