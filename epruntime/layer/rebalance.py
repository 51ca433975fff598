"""Rebalancing while running: every ``runtime.rebalance_every`` forward calls of a layer, place its experts anew
from the load of its last ``runtime.load_window`` calls and move the weights that must move.

:func:`attach_rebalancer` (called by ``EPMoE.__init__`` when ``rebalance_every > 0``) gives the layer a windowed
:class:`~epruntime.layer.load.ExpertLoad` and a :class:`Rebalancer`, run by a forward post-hook: between forward
calls (after a forward's output is computed, before the next one starts), never inside one. A rebalance, on
every rank together, in the hook of call N:

1. :meth:`Rebalancer.begin`: ``loads``, the window load ``[E]`` summed over the EP world (one rank per expert-TP
   group: each token once); ``placement_start``: rank 0 of the job runs :func:`place`:
   :func:`~epruntime.eplb.placement.rebalance_experts` on that load (one layer; the model's expert groups, the EP
   world's nodes and ranks; per node under node-limited routing, whose experts stay on their node), relabelled
   to keep as many slots as possible (:func:`~epruntime.layer.slot_transfer.align`), or the old placement unless the
   new one lowers the predicted busiest rank;
2. :meth:`Rebalancer.finish`: ``placement``, rank 0's ``phy2log`` to every rank of every EP sub-world;
   ``transfer``, only the changed slots move, peer to peer over the EP world (each rank its own expert-TP slice,
   FP8 blocks with their scales: :func:`~epruntime.layer.slot_transfer.move_slots`); ``swap``, the weights are in
   place, ``layer.placement`` and ``layer.remap`` switch.

With ``Rebalancer.background`` set, rank 0 runs :func:`place` in a thread instead and step 2 happens in the hook
of call N + 1, which runs on the old placement (rank 0 waits for its thread there if it has not finished). The
thread shares the GIL with the forward: on a CPU-bound rank it only moves the cost into the forwards, so it is
off by default (docs/eplb.md has the figures).

Then, outside the stall, ``measure`` times one ``all_to_all_single`` of the same bytes over the EP world (median
of :data:`A2A_TRIALS`) and one all-gather collects the figures of :attr:`Rebalancer.events`. Every collective has
the groups' timeout; failures name the stage (``layer 3 > rebalance > transfer``) like any other.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from epruntime.eplb.metrics import gpu_loads
from epruntime.eplb.placement import logical_maps, rebalance_experts
from epruntime.layer.slot_transfer import MovePlan, align, move_slots, plan_moves, slot_bytes
from epruntime.parallel import health

if TYPE_CHECKING:
    from torch import nn

    from epruntime.layer.moe import EPMoE
    from epruntime.parallel.layout import EPView
    from epruntime.parallel.runtime import Runtime

A2A_TRIALS = 3  # all-to-alls timed per rebalance, the median reported


def busiest_over_mean(load: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> float:  # [E], [P]
    """The predicted heaviest rank over the mean rank (an expert's load split evenly over its replicas)."""
    _, logcnt = logical_maps(phy2log.view(1, -1).cpu(), len(load))  # [1, E]
    loads = gpu_loads(load.view(1, -1).cpu().double(), phy2log.view(1, -1).cpu(), logcnt, num_gpus)[0]  # [G]
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


def place(
    load: torch.Tensor,  # [E] pairs per logical expert
    old: torch.Tensor,  # [P] the current phy2log
    slots_per_rank: int,
    ranks_per_node: int,
    num_groups: int,
    node_limited: bool,
) -> torch.Tensor:  # [P] the next phy2log
    """The next placement (the module's step 2, without the broadcast): ``old`` when the load is empty or the new
    placement would not lower the predicted busiest rank."""
    load, old = load.cpu().double(), old.cpu().long()
    e, p = len(load), len(old)
    gpus = p // slots_per_rank
    nodes = gpus // ranks_per_node
    if float(load.sum()) == 0:
        return old
    if node_limited and nodes > 1:  # each node places its own experts on its own slots
        en, pn = e // nodes, p // nodes
        groups = num_groups // nodes if num_groups % nodes == 0 else 1
        parts = [
            rebalance_experts(load[n * en : (n + 1) * en].view(1, -1), pn, groups, 1, ranks_per_node, search=False)[0][
                0
            ]
            + n * en
            for n in range(nodes)
        ]
        new = torch.cat(parts)
    else:
        new = rebalance_experts(load.view(1, -1), p, num_groups, nodes, gpus, search=False)[0][0]
    new = align(old, new, slots_per_rank, ranks_per_node, e, keep_nodes=node_limited)
    before, after = busiest_over_mean(load, old, gpus), busiest_over_mean(load, new, gpus)
    return new if after < before * (1 - 1e-9) else old


def slot_tensors(experts: nn.Module) -> list[torch.Tensor]:
    """Every per-slot tensor ``[S_local, ...]`` of a layer's experts, in registration order: ``w13``, ``w2``, or
    with FP8 blocks ``w13_weight``, ``w13_scale_inv``, ``w2_weight``, ``w2_scale_inv``."""
    slots = experts.num_experts
    return [t for t in experts.parameters() if t.dim() and t.shape[0] == slots]


@contextmanager
def _timed(name: str, parts: dict[str, float]) -> Iterator[None]:
    """A stage mark (failures name it) that also records its wall ms in ``parts[name]``."""
    start = time.perf_counter()
    with health.stage(name):
        yield
    parts[name] = 1e3 * (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all_to_all(total_bytes: int, ep: EPView) -> float:  # wall ms on this rank
    """One ``all_to_all_single`` over the EP world moving ``total_bytes`` in all: every rank sends an equal share,
    split evenly over its peers (nothing to itself). Measuring only: runs at rebalance time, never in a forward."""
    w = ep.world_size
    if w < 2 or total_bytes == 0:
        return 0.0
    per_peer = -(-total_bytes // (w * (w - 1)))
    splits = [0 if r == ep.rank else per_peer for r in range(w)]
    send = torch.zeros(per_peer * (w - 1), dtype=torch.uint8, device=ep.device)
    recv = torch.empty_like(send)
    dist.all_reduce(torch.zeros(1, device=ep.device), group=ep.world)  # start together
    _sync(ep.device)
    start = time.perf_counter()
    dist.all_to_all_single(recv, send, splits, splits, group=ep.world)
    _sync(ep.device)
    return 1e3 * (time.perf_counter() - start)


@dataclass
class _Pending:
    """A rebalance between its two steps: the summed load, the placement it started from, rank 0's placement
    (computing, or done), this rank's blocked ms so far per stage, and when it began."""

    total: torch.Tensor  # [E] window load summed over the EP world
    old: torch.Tensor  # [P] phy2log when it began (CPU)
    placement: Future | None  # rank 0 of the world: (phy2log [P], ms) from place(); None elsewhere
    parts: dict[str, float]
    began: float  # perf_counter at the start
    load_call: int  # the forward call whose window load it uses
    skew_ms: float  # waited for the other ranks at the start


def _timed_place(*args: Any) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    row = place(*args)
    return row, 1e3 * (time.perf_counter() - start)


class Rebalancer:
    """One layer's online rebalancing: counts its forward calls (a post-hook); after every ``every``-th it
    rebalances (:meth:`begin`, :meth:`finish`; with ``background`` the next call's hook finishes it);
    :meth:`rebalance` does one now. The forwards wait only inside the hooks.

    ``events`` holds one dict per rebalance (the same on every rank but the ``_rank`` keys and ``bytes_sent``):
    ``call`` (of the swap), ``load_call`` (of the load used), ``changed``, ``slots_changed``, ``local_copies``
    (changed slots filled without crossing ranks), ``bytes_per_slot`` (one expert slice), ``bytes_sent`` (this
    rank), ``bytes_moved`` (all ranks), ``stall_ms`` (the stages of both steps, counted once every rank has
    arrived, slowest rank), ``stall_with_skew_ms`` (plus the wait for the other ranks' forwards),
    ``stall_ms_rank`` and ``stall_parts_ms_rank`` (this rank, per stage), ``span_ms`` (begin to swap, with
    ``background`` the forward between included), ``placement_ms`` (rank 0's :func:`place`), ``all_to_all_ms``
    (one all-to-all of the same bytes, slowest rank, median of 3), ``stall_over_all_to_all`` (the goal: at most 2) and
    ``busiest_over_mean_before`` / ``_after`` (predicted from the window load).
    """

    def __init__(
        self, layer: EPMoE, ep: EPView, world: dist.ProcessGroup, every: int, num_groups: int, node_limited: bool
    ) -> None:
        self._layer = weakref.ref(layer)  # the layer holds this object: no reference cycle
        self.ep, self.world, self.every = ep, world, every
        self.num_groups, self.node_limited = num_groups, node_limited
        self.calls = 0  # forward calls seen
        self.events: list[dict[str, Any]] = []
        self.pending: _Pending | None = None
        # True: rank 0 places in a thread while call N + 1 runs, the swap follows that call (see the module doc)
        self.background = False
        self._pool: ThreadPoolExecutor | None = None  # rank 0's placement thread, made on first use
        self.hook = layer.register_forward_hook(self.after_forward)

    def after_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """The post-hook (the output is computed already): count the call, finish a pending rebalance; after every
        ``every``-th call rebalance (with ``background``, begin one)."""
        if output.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph capture: nothing happens between its replays
        self.calls += 1
        if self.pending is not None:
            self.finish()
        if self.calls % self.every == 0:
            self.begin(background=self.background)
            if not self.background:
                self.finish()

    def rebalance(self, load: torch.Tensor | None = None) -> dict[str, Any]:
        """One whole rebalance now, on every rank together, from this rank's ``load [E]`` (default: the layer's
        window load). Returns its event."""
        if self.pending is not None:
            self.finish()
        self.begin(load, background=False)
        return self.finish()

    def _guard(self) -> EPMoE:
        """The layer this rebalancer serves (held weakly)."""
        layer = self._layer()
        assert layer is not None, "the layer of this rebalancer is gone"
        return layer

    def _arrive(self, device: torch.device) -> float:
        """Wait until every rank of the job is here (a one-element all-reduce); return the ms waited. The stall is
        counted from here: a rank that came early waits for the others' forwards, not for the rebalance."""
        start = time.perf_counter()
        dist.all_reduce(torch.zeros(1, device=device), group=self.world)
        return 1e3 * (time.perf_counter() - start)

    @torch.no_grad()
    def begin(self, load: torch.Tensor | None = None, background: bool = True) -> None:
        """Step 1 (collective over the EP world): the summed load; rank 0 of the world starts the placement."""
        layer, ep, parts = self._guard(), self.ep, {}
        began = time.perf_counter()
        with health.failures_named(), health.stage(layer.label), health.stage("rebalance"):
            skew = self._arrive(ep.device)
            with _timed("loads", parts):
                total = (layer.load.window_load() if load is None else load).to(ep.device, torch.int64).clone()  # [E]
                dist.all_reduce(total, group=ep.world)
            with _timed("placement_start", parts):
                old, p = layer.placement.phy2log.cpu(), layer.placement
                args = (total.cpu(), old, p.slots_per_rank, p.ranks_per_node, self.num_groups, self.node_limited)
                future = None
                if dist.get_rank(self.world) == 0:
                    if background:
                        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="epruntime-eplb")
                        future = self._pool.submit(_timed_place, *args)
                    else:
                        future = Future()
                        future.set_result(_timed_place(*args))
        self.pending = _Pending(total, old, future, parts, began, self.calls, skew)

    @torch.no_grad()
    def finish(self) -> dict[str, Any]:
        """Step 2 (collective): rank 0's placement to every rank, move the changed slots, swap; then measure."""
        layer, ep, pending = self._guard(), self.ep, self.pending
        assert pending is not None, "finish() without begin()"
        self.pending, parts = None, pending.parts
        s, rpn = layer.placement.slots_per_rank, layer.placement.ranks_per_node
        with health.failures_named(), health.stage(layer.label), health.stage("rebalance"):
            skew = pending.skew_ms + self._arrive(ep.device)
            with _timed("placement", parts):
                row = torch.zeros(len(pending.old), dtype=torch.int64)  # [P] rank 0's, zeros elsewhere
                placement_ms = 0.0
                if pending.placement is not None:
                    row, placement_ms = pending.placement.result()  # rank 0 waits here if it is not done
                row = row.to(ep.device)
                dist.all_reduce(row, group=self.world)  # a broadcast from rank 0 that also waits for every rank
                new = row.cpu()
                plan = plan_moves(pending.old, new, s, rpn)
            tensors = slot_tensors(layer.experts)
            with _timed("transfer", parts):
                sent = move_slots(tensors, plan, ep.rank, ep.world)
            with _timed("swap", parts):
                if plan.moves:
                    placement = type(layer.placement).from_row(new, len(pending.total), ep.world_size, rpn)
                    layer.placement = placement.to(layer.device)
                    layer.remap = not placement.is_identity
                _sync(layer.device)
            swapped = time.perf_counter()
            with health.stage("measure"):
                stall_ms = sum(parts.values())
                event = self._measure(plan, tensors, sent, (stall_ms, stall_ms + skew, placement_ms))
        event.update(
            load_call=pending.load_call,
            span_ms=1e3 * (swapped - pending.began),
            stall_parts_ms_rank=parts,
            busiest_over_mean_before=busiest_over_mean(pending.total, pending.old, ep.world_size),
            busiest_over_mean_after=busiest_over_mean(pending.total, new, ep.world_size),
        )
        self.events.append(event)
        return event

    def _measure(
        self, plan: MovePlan, tensors: list[torch.Tensor], sent: int, times: tuple[float, float, float]
    ) -> dict[str, Any]:
        """The all-to-all of the same bytes, then one all-gather of every rank's figures over the job's world."""
        ep = self.ep
        ep_bytes = torch.tensor([sent], dtype=torch.int64, device=ep.device)
        dist.all_reduce(ep_bytes, group=ep.world)  # what this EP sub-world moved
        a2a = [time_all_to_all(int(ep_bytes), ep) for _ in range(A2A_TRIALS)]
        mine = torch.tensor([sent, *times, *a2a], dtype=torch.float64, device=ep.device)  # [4 + trials]
        every = torch.empty(dist.get_world_size(self.world) * len(mine), dtype=torch.float64, device=ep.device)
        health.all_gather_flat(every, mine, self.world)
        table = every.view(-1, len(mine)).cpu()  # [world, 4 + trials]: sent, stall, with skew, placement, a2a...
        stall = float(table[:, 1].max())
        moved = int(ep_bytes) and ep.world_size > 1
        a2a_ms = statistics.median(table[:, 4:].max(0).values.tolist()) if moved else None
        return {
            "call": self.calls,
            "changed": bool(plan.moves),
            "slots_changed": len(plan.moves),
            "local_copies": sum(plan.is_local(m) for m in plan.moves),
            "bytes_per_slot": slot_bytes(tensors),
            "bytes_sent": sent,
            "bytes_moved": int(table[:, 0].sum()),
            "stall_ms": stall,
            "stall_ms_rank": times[0],
            "stall_with_skew_ms": float(table[:, 2].max()),
            "placement_ms": float(table[:, 3].max()),
            "all_to_all_ms": a2a_ms,
            "stall_over_all_to_all": stall / a2a_ms if a2a_ms else None,
        }


def attach_rebalancer(layer: EPMoE, rt: Runtime) -> Rebalancer:
    """Give ``layer`` online rebalancing as ``rt``'s config asks (``runtime.rebalance_every`` > 0): a load ring of
    ``runtime.load_window`` calls (``layer.load``) and a :class:`Rebalancer` on a forward post-hook
    (``layer.rebalancer``)."""
    run, model = rt.cfg.runtime, rt.cfg.model
    layer.load = type(layer.load)(model.n_routed_experts, rt.device, run.load_window)  # an ExpertLoad with a window
    node_limited = model.max_nodes_per_token is not None
    layer.rebalancer = Rebalancer(
        layer, rt.layout.ep, rt.layout.world, run.rebalance_every, model.n_group, node_limited
    )
    return layer.rebalancer
