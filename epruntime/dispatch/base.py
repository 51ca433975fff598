"""The dispatch contract every backend fulfils, plus traffic counters and exchange helpers.

A dispatcher sends each token once to every rank that hosts at least one of its top-k experts
(DeepEP's normal-mode layout) and, on combine, sums the per-rank results back into one row per
source token. Combine is a plain sum: the expert stage has already applied the routing weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..runtime import Runtime

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


@dataclass
class Traffic:
    """Bytes this rank sent, per phase and link; sends to itself cross no link and are not counted."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, phase: str, link: str, nbytes: int) -> None:
        self.bytes[f"{phase}.{link}"] += int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    def as_tensor(self) -> torch.Tensor:  # [len(PHASES) * len(LINKS)] int64, fixed order for reduction
        return torch.tensor([self.bytes[f"{p}.{l}"] for p in PHASES for l in LINKS], dtype=torch.int64)


def traffic_report(totals: torch.Tensor) -> dict[str, Any]:
    """Nested JSON form of a reduced :meth:`Traffic.as_tensor`: per phase, and per link overall."""
    values = dict(zip([f"{p}.{l}" for p in PHASES for l in LINKS], totals.tolist()))
    report: dict[str, Any] = {p: {l: values[f"{p}.{l}"] for l in LINKS} for p in PHASES}
    for link in LINKS:
        report[link] = sum(values[f"{p}.{link}"] for p in PHASES)
    return report


def all_to_all_rows(
    rows: torch.Tensor,  # [P, *] rows ordered by destination
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:  # [sum(recv_counts), *]
    """Uneven all-to-all of whole rows over ``group``."""
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group)
    return out


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of one int64 count per peer: ``recv[i]`` is what peer ``i`` will send here."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


def pack_routing(local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Local expert ids [P, K] and fp32 weights [P, K] as one int32 tensor [P, 2K] for one send."""
    return torch.cat([local_idx.to(torch.int32), weights.float().contiguous().view(torch.int32)], dim=1)


def unpack_routing(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_routing`: ids [R, K] int64 and weights [R, K] fp32."""
    k = packed.shape[1] // 2
    return packed[:, :k].long(), packed[:, k:].contiguous().view(torch.float32)


def count_tokens_per_expert(recv_topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[E_local] number of (row, k) pairs routed to each local expert."""
    ids = recv_topk_idx[recv_topk_idx >= 0]
    return torch.bincount(ids, minlength=num_local_experts)


class Dispatcher(ABC):
    """Moves tokens to the ranks that own their experts and the results back."""

    name: str = ""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.traffic = Traffic()

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

    def count_sends(self, phase: str, dest_ranks: list[int], counts: list[int], row_bytes: int, meta_bytes: int) -> None:
        """Add payload and metadata bytes sent to world ranks ``dest_ranks`` to the traffic counters."""
        topo, me = self.rt.topo, self.rt.rank
        for dest, n in zip(dest_ranks, counts):
            if dest == me or n == 0:
                continue
            link = "intra_node" if topo.node_of(dest) == topo.node_of(me) else "inter_node"
            self.traffic.add(phase, link, n * row_bytes)
            self.traffic.add(phase, "metadata", n * meta_bytes)
