"""A one-rank expert-parallel world: every expert is local, so dispatch and combine move nothing.

``flat`` and ``hierarchical`` become this dispatcher when the EP world has one rank (one process, or
``moe_tp`` spanning the whole job): the received rows are the input rows, the routing ids are
already local, and combine returns the expert stage's output as it is (one partial per token, so
there is nothing to sum). It keeps the configured name, so summaries report what the user chose.
"""

from __future__ import annotations

import torch

from epruntime.dispatch.base import Dispatcher, DispatchResult, DispatchSpec, count_tokens_per_expert
from epruntime.parallel.layout import EPView


class LocalDispatcher(Dispatcher):
    """Dispatch and combine within one rank: no copies, no collectives, no traffic."""

    def __init__(self, ep: EPView, spec: DispatchSpec, name: str) -> None:
        super().__init__(ep, spec)
        self.name = name

    def dispatch(
        self,
        x: torch.Tensor,  # [T, H]
        topk_idx: torch.Tensor,  # [T, K] global ids, which are the local ids here
        topk_weights: torch.Tensor,  # [T, K]
    ) -> DispatchResult:
        tokens_per_expert = count_tokens_per_expert(topk_idx, self.slots_per_rank)  # [E]
        return DispatchResult(x, topk_idx, topk_weights.float(), tokens_per_expert, handle=None)

    def combine(self, y: torch.Tensor, handle: None) -> torch.Tensor:  # [T, H] -> [T, H]
        return y
