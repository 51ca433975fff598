"""The dispatch contract every backend fulfils, plus traffic counters and exchange helpers.

A dispatcher sends each token once to every rank that hosts at least one of its top-k experts
(DeepEP's normal-mode layout) and, on combine, sums the per-rank results back into one row per
source token. Combine is a plain sum: the expert stage has already applied the routing weights.
The low-latency backends return :class:`MaskedDispatchResult` instead (DeepEP's low-latency
layout: fixed capacity per local expert); there combine applies the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from epruntime.parallel.layout import EPView

PHASES = ("dispatch", "combine")
LINKS = ("intra_node", "inter_node", "metadata")


@dataclass
class DispatchResult:
    """What a rank receives: each needed token once, with its routing restricted to local experts."""

    recv_x: torch.Tensor  # [R, H] activation dtype
    recv_topk_idx: torch.Tensor  # [R, K] int64 local expert ids, -1 where the expert lives elsewhere
    recv_topk_weights: torch.Tensor  # [R, K] fp32 routing weights
    tokens_per_expert: torch.Tensor  # [E_local] int64 (row, k) pairs per local expert
    handle: Any  # backend-specific: what combine needs to send results back

    def pairs_on_device(self) -> torch.Tensor:  # [] int64
        """(token, local expert) pairs received, as a device scalar (no host sync)."""
        return self.tokens_per_expert.sum()

    def num_pairs(self) -> int:
        """(token, local expert) pairs received (reads the count on the host)."""
        return int(self.pairs_on_device())


@dataclass
class MaskedDispatchResult:
    """The low-latency layout (DeepEP's ``low_latency_dispatch``): a fixed-capacity block per local expert.

    Expert ``e``'s valid rows are ``recv_x[e, :masked_m[e]]``, ordered by source rank; the rows after
    them are unspecified and ignored. ``capacity = max_tokens_per_rank * world_size``, so no expert can
    overflow. The expert stage returns the unweighted expert outputs in the same layout, and combine
    applies the routing weights and sums them back to the source tokens.
    """

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [E_local, C, H]; or DeepEP's FP8 (rows, scales)
    masked_m: torch.Tensor  # [E_local] int32 valid rows per local expert (DeepEP's recv_count)
    handle: Any  # backend-specific: what combine needs to weight and send results back

    def pairs_on_device(self) -> torch.Tensor:  # [] int64
        """(token, local expert) pairs received: the valid rows, as a device scalar (no host sync)."""
        return self.masked_m.sum().long()

    def num_pairs(self) -> int:
        """(token, local expert) pairs received: the valid rows (reads the count on the host)."""
        return int(self.pairs_on_device())


@dataclass
class Traffic:
    """Bytes this rank sent, per phase and link; sends to itself cross no link and are not counted.

    ``bytes`` holds host counts; ``on_device`` (``[len(PHASES), len(LINKS)]`` int64, allocated before
    any CUDA graph capture) accumulates counts of backends that must not sync with the host.
    """

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    on_device: torch.Tensor | None = None

    def add(self, phase: str, link: str, nbytes: int) -> None:
        self.bytes[f"{phase}.{link}"] += int(nbytes)

    def add_on_device(self, phase: str, link_bytes: torch.Tensor) -> None:  # [len(LINKS)] int64
        """Accumulate bytes per link in place, without reading anything back to the host."""
        self.on_device[PHASES.index(phase)].add_(link_bytes)

    def reset(self) -> None:
        self.bytes.clear()
        if self.on_device is not None:
            self.on_device.zero_()

    def as_tensor(self) -> torch.Tensor:  # [len(PHASES) * len(LINKS)] int64, fixed order for reduction
        host = torch.tensor([self.bytes[f"{p}.{l}"] for p in PHASES for l in LINKS], dtype=torch.int64)
        return host if self.on_device is None else host + self.on_device.flatten().cpu()


def traffic_report(totals: torch.Tensor) -> dict[str, Any]:
    """Nested JSON form of a reduced :meth:`Traffic.as_tensor`: per phase, and per link overall."""
    values = dict(zip([f"{p}.{l}" for p in PHASES for l in LINKS], totals.tolist(), strict=True))
    report: dict[str, Any] = {p: {l: values[f"{p}.{l}"] for l in LINKS} for p in PHASES}
    for link in LINKS:
        report[link] = sum(values[f"{p}.{link}"] for p in PHASES)
    return report


def issue_all_to_all_rows(
    rows: torch.Tensor,  # [P, *] rows ordered by destination
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, dist.Work]:
    """Start an uneven all-to-all of whole rows; the output ``[sum(recv_counts), *]`` is valid after wait."""
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    work = dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group, async_op=True)
    return out, work


def all_to_all_rows(
    rows: torch.Tensor,  # [P, *] rows ordered by destination
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:  # [sum(recv_counts), *]
    """Uneven all-to-all of whole rows over ``group``."""
    out, work = issue_all_to_all_rows(rows, send_counts, recv_counts, group)
    work.wait()
    return out


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of one int64 count per peer: ``recv[i]`` is what peer ``i`` will send here."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


@dataclass
class InFlight:
    """Collectives issued with ``async_op=True`` and what turns their buffers into the result."""

    works: list[dist.Work]
    finish: Callable[[], Any]

    def wait(self) -> Any:
        for work in self.works:
            work.wait()
        return self.finish()


@dataclass
class Hop:
    """One uneven all-to-all over ``group``: which input row goes to which peer, and the split sizes.

    Rows arrive grouped by sending peer, each peer's rows in its own order, so the position of a
    received row says where it came from; :meth:`reduce_back` returns results along the same splits.
    """

    group: dist.ProcessGroup
    peers: list[int]  # world rank of each group member, in group order
    src_row: torch.Tensor  # [P] int64 input row of each sent row, ordered by destination
    dest: torch.Tensor  # [P] int64 group-local destination of each sent row
    send_counts: list[int]  # [D] rows sent to each peer
    recv_counts: list[int]  # [D] rows received from each peer

    @classmethod
    def plan(cls, needs: torch.Tensor, group: dist.ProcessGroup, peers: list[int], device: torch.device) -> Hop:
        """One sent row per True in ``needs [N, D]`` (input row n goes to peer d); exchanges the counts."""
        dest, src_row = needs.t().nonzero(as_tuple=True)  # [P], [P] ordered by destination
        send_counts = needs.sum(dim=0)  # [D] int64
        recv_counts = exchange_counts(send_counts, group).tolist()
        return cls(group, peers, src_row.to(device), dest.to(device), send_counts.tolist(), recv_counts)

    def issue(self, rows: torch.Tensor) -> InFlight:  # [P, *] ordered by destination -> [R, *] once waited
        """Start delivering the sent rows (already gathered by ``src_row``) to their peers."""
        out, work = issue_all_to_all_rows(rows, self.send_counts, self.recv_counts, self.group)
        return InFlight([work], lambda: out)

    def issue_dispatch(
        self, rows: torch.Tensor, routing: torch.Tensor, num_local_experts: int, handle: Any
    ) -> InFlight:  # rows [P, H], routing [P, 2K] local ids -> DispatchResult once waited
        """Start the last hop of a dispatch: rows and their routing in one all-to-all; waiting gives the
        receiver's :class:`DispatchResult` (with ``handle`` for combine)."""
        sent = self.issue(attach_routing(rows, routing))

        def finish() -> DispatchResult:
            recv_x, recv_idx, recv_weights = detach_routing(sent.wait(), rows.shape[1])  # [R, H], [R, K], [R, K]
            tokens_per_expert = count_tokens_per_expert(recv_idx, num_local_experts)
            return DispatchResult(recv_x, recv_idx, recv_weights, tokens_per_expert, handle)

        return InFlight([], finish)

    def send(self, rows: torch.Tensor) -> torch.Tensor:  # [P, *] ordered by destination -> [R, *]
        """Deliver the sent rows (already gathered by ``src_row``) to their peers."""
        return self.issue(rows).wait()

    def issue_reduce_back(self, rows: torch.Tensor, num_rows: int) -> InFlight:  # [R, H] -> [N, H] fp32 once waited
        """Start returning each received row's result to its sender, which then sums them per input row in fp32."""
        back, work = issue_all_to_all_rows(rows, self.recv_counts, self.send_counts, self.group)  # [P, H]

        def finish() -> torch.Tensor:
            out = torch.zeros(num_rows, rows.shape[1], dtype=torch.float32, device=rows.device)  # [N, H]
            return out.index_add_(0, self.src_row, back.float())

        return InFlight([work], finish)

    def reduce_back(self, rows: torch.Tensor, num_rows: int) -> torch.Tensor:  # [R, H] -> [N, H] fp32
        """Return each received row's result to its sender, which sums the results per input row in fp32."""
        return self.issue_reduce_back(rows, num_rows).wait()


def pack_routing(local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Local expert ids [P, K] and fp32 weights [P, K] as one int32 tensor [P, 2K] for one send."""
    return torch.cat([local_idx.to(torch.int32), weights.float().contiguous().view(torch.int32)], dim=1)


def unpack_routing(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_routing`: ids [R, K] int64 and weights [R, K] fp32."""
    k = packed.shape[1] // 2
    return packed[:, :k].long(), packed[:, k:].contiguous().view(torch.float32)


def attach_routing(rows: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """Rows ``[P, H]`` and packed routing ``[P, 2K]`` int32 as one tensor, so they travel in one all-to-all."""
    return torch.cat([rows, routing.view(rows.dtype)], dim=1)  # [P, H + 8K / element size]


def detach_routing(packed: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`attach_routing`: rows ``[R, H]`` (a view), ids ``[R, K]`` int64, weights ``[R, K]`` fp32."""
    return packed[:, :hidden], *unpack_routing(packed[:, hidden:].contiguous().view(torch.int32))


def count_tokens_per_expert(recv_topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[E_local] number of (row, k) pairs routed to each local expert (-1 ids count nowhere); no host sync."""
    ids = recv_topk_idx.reshape(-1)  # [R * K]
    counts = torch.zeros(num_local_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())


@dataclass(frozen=True)
class DispatchSpec:
    """What a dispatcher knows of the layer it serves (never the whole config)."""

    hidden_size: int  # H, the width of a row
    dtype: torch.dtype  # the activation dtype of the rows
    num_experts: int  # routed experts over the whole EP world
    capacity: int  # tokens per rank of the fixed-capacity (low-latency) layouts: runtime.max_tokens_per_rank


class Dispatcher(ABC):
    """Moves tokens to the EP ranks that own their experts and the results back, within ``ep``."""

    name: str = ""

    def __init__(self, ep: EPView, spec: DispatchSpec) -> None:
        self.ep, self.spec = ep, spec
        if spec.num_experts % ep.world_size:
            raise ValueError(f"{spec.num_experts} expert slots do not divide over the EP world of {ep.world_size}")
        self.slots_per_rank = spec.num_experts // ep.world_size  # E_local: slot p lives on EP rank p // this
        self.slots_per_node = self.slots_per_rank * ep.topo.ranks_per_node
        self.traffic = Traffic(on_device=torch.zeros(len(PHASES), len(LINKS), dtype=torch.int64, device=ep.device))
        links = [self._link(r) for r in range(ep.world_size)]
        self._link_of_rank = torch.tensor(  # [2, W] 1 where a send to rank r crosses that link
            [[link == name for link in links] for name in ("intra_node", "inter_node")], dtype=torch.int64
        ).to(ep.device)

    def _link(self, dest: int) -> str | None:
        """The link a send to EP rank ``dest`` crosses; None for this rank itself."""
        if dest == self.ep.rank:
            return None
        return "intra_node" if self.ep.topo.node_of(dest) == self.ep.node else "inter_node"

    @abstractmethod
    def dispatch(
        self,
        x: torch.Tensor,  # [T, H]
        topk_idx: torch.Tensor,  # [T, K] int64 global expert ids
        topk_weights: torch.Tensor,  # [T, K] fp32
    ) -> DispatchResult:
        """Send each token once to every rank hosting one of its experts."""

    @abstractmethod
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """Sum the per-rank results ``y [R, H]`` back to ``[T, H]`` on the source ranks."""

    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight:
        """Issue the dispatch; a backend that can returns before its last collective has finished."""
        result = self.dispatch(x, topk_idx, topk_weights)
        return InFlight([], lambda: result)

    def dispatch_b(self, inflight: InFlight) -> DispatchResult:
        """Wait for an issued dispatch and return its result."""
        return inflight.wait()

    def combine_a(self, y: torch.Tensor, handle: Any) -> InFlight:
        """Issue the combine; a backend that can returns before its last collective has finished."""
        out = self.combine(y, handle)
        return InFlight([], lambda: out)

    def combine_b(self, inflight: InFlight) -> torch.Tensor:
        """Wait for an issued combine and return ``[T, H]``."""
        return inflight.wait()

    def count_expert_sends(self, phase: str, topk_idx: torch.Tensor, row_bytes: int, meta_bytes: int) -> None:
        """Add one message of ``row_bytes`` + ``meta_bytes`` per (token, expert) pair of ``topk_idx [T, K]`` (-1:
        none) to the expert's rank: DeepEP's low-latency layout. Computed on the device, no host sync."""
        pairs = (topk_idx >= 0).reshape(-1).long()  # [T * K]
        dest = torch.div(topk_idx.clamp(min=0), self.slots_per_rank, rounding_mode="floor").reshape(-1)
        per_rank = torch.zeros(self.ep.world_size, dtype=torch.int64, device=topk_idx.device)
        per_rank.scatter_add_(0, dest.long(), pairs)  # [W] pairs sent to each rank
        intra, inter = (self._link_of_rank * per_rank).sum(dim=1)  # pairs crossing each link
        link_bytes = torch.stack([intra * row_bytes, inter * row_bytes, (intra + inter) * meta_bytes])  # LINKS order
        self.traffic.add_on_device(phase, link_bytes)

    def count_sends(
        self, phase: str, dest_ranks: list[int], counts: list[int], row_bytes: int, meta_bytes: int
    ) -> None:
        """Add payload and metadata bytes sent to EP ranks ``dest_ranks`` to the traffic counters."""
        for dest, n in zip(dest_ranks, counts, strict=True):
            link = self._link(dest)
            if link is None or n == 0:
                continue
            self.traffic.add(phase, link, n * row_bytes)
            self.traffic.add(phase, "metadata", n * meta_bytes)


class AsyncDispatcher(Dispatcher):
    """A backend whose ``dispatch_a`` / ``combine_a`` return with their last collective still in flight."""

    @abstractmethod
    def dispatch_a(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> InFlight: ...

    @abstractmethod
    def combine_a(self, y: torch.Tensor, handle: Any) -> InFlight: ...

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self.dispatch_a(x, topk_idx, topk_weights).wait()

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine_a(y, handle).wait()
