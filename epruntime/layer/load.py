"""Expert load, counted on the device in every forward (no host sync): what EPLB placements are made from."""

from __future__ import annotations

import torch

from epruntime.dispatch.base import DispatchResult, MaskedDispatchResult


class ExpertLoad:
    """Per layer: (token, logical expert) pairs its router chose, in total and for each of the last ``window``
    calls (a ring), and the (token, expert) pairs this rank's expert stage received."""

    def __init__(self, num_experts: int, device: torch.device, window: int = 0) -> None:
        self.routed = torch.zeros(num_experts, dtype=torch.int64, device=device)  # [E] since the last reset
        self.recent = torch.zeros(window, num_experts, dtype=torch.int64, device=device)  # [window, E] ring
        self.received = torch.zeros((), dtype=torch.int64, device=device)  # pairs received since the last reset
        self.calls = 0  # forwards since the last reset (a host count: no sync)
        self.total_calls = 0  # forwards ever (the ring's position)

    def count_routes(self, topk_idx: torch.Tensor) -> None:  # [T, K] logical expert ids
        """Add one forward's routes."""
        ids = topk_idx.reshape(-1)
        ones = torch.ones_like(ids)
        self.routed.scatter_add_(0, ids, ones)
        if len(self.recent):
            row = self.recent[self.total_calls % len(self.recent)]
            row.zero_().scatter_add_(0, ids, ones)
        self.calls += 1
        self.total_calls += 1

    def count_received(self, result: DispatchResult | MaskedDispatchResult) -> None:
        """Add the pairs one dispatch delivered to this rank's experts."""
        self.received += result.pairs_on_device()

    def window_load(self) -> torch.Tensor:  # [E] pairs per expert over the last min(calls, window) forwards
        """The load a rebalance looks at (summed over the ring)."""
        return self.recent.sum(dim=0)

    def reset(self) -> None:
        """Start counting afresh (the ring keeps its history)."""
        self.routed.zero_()
        self.received.zero_()
        self.calls = 0
