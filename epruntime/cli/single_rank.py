"""The multi-rank benchmark's baseline: rank 0 alone, with all cores and all experts, on every rank's tokens.

Its calls are timed in turns between the multi-rank layer's (``measure_layer(..., between=...)``), so
that both see the same machine: on a shared VM whose speed drifts over minutes, a baseline timed
before or after the sweep would move the ratio by more than the effect being measured.
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist

from epruntime.cli.measure import synthetic_tokens, wall_and_cpu_ms
from epruntime.layer.moe import EPMoE
from epruntime.parallel.runtime import Runtime, sub_runtime


class SingleRankBaseline:
    """Rank 0's one-rank layer on the tokens of all ranks; the other ranks wait at a barrier meanwhile.

    Every rank constructs it (it creates a process group) and calls :meth:`turn` at the same points.
    """

    def __init__(self, rt: Runtime, layer_seed: int, tokens_per_rank: int) -> None:
        self.rt = rt
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []  # host CPU ms of the same calls, all threads
        group = dist.new_group([0])  # a collective call: every rank makes it
        self.layer: EPMoE | None = None
        if rt.rank == 0:
            one = sub_runtime(rt, group)
            self.layer = EPMoE.random(one.cfg.model, one, seed=layer_seed)
            self.x = torch.cat([synthetic_tokens(rt.cfg, r, tokens_per_rank) for r in range(rt.world_size)])
            self.x = self.x.to(rt.device)  # [W * T, H]

    def turn(self, calls: int) -> None:
        """One untimed and ``calls`` timed forwards on rank 0 with every core, once every rank has finished
        its own work (so rank 0 runs alone); all ranks return together."""
        dist.barrier()
        if self.layer is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                self.layer(self.x)
                for _ in range(calls):
                    wall, cpu = wall_and_cpu_ms(lambda: self.layer(self.x), self.rt.device)
                    self.samples.append(wall)
                    self.cpu_samples.append(cpu)
            finally:
                torch.set_num_threads(threads)
        dist.barrier()

    def median_ms(self) -> float | None:
        """Median wall ms of the timed calls so far (rank 0); None on the other ranks."""
        return statistics.median(self.samples) if self.samples else None

    def median_cpu_ms(self) -> float | None:
        """Median host-CPU ms of the timed calls so far (rank 0, every thread); None on the other ranks."""
        return statistics.median(self.cpu_samples) if self.cpu_samples else None
