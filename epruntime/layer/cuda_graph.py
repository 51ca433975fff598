"""CUDA graphs for the decode path: capture one EPMoE forward at a fixed token count, then replay it.

Only the dispatchers the registry declares ``graph_safe`` may be captured (fixed capacity, no host
synchronisation: ``lowlatency``, ``deepep_low_latency``). Inside a capture the masked expert stage
cannot read ``masked_m`` on the host, so without DeepGEMM it runs every slot of ``[E_local, C, H]`` (the
padding rows are ignored); ``grouped_gemm: deep_gemm`` runs only the valid rows. The layer runs
uninstrumented (no probe, no finite check) for warm-up and capture. This module imports
without CUDA; capturing needs it.
"""

from __future__ import annotations

import torch

from epruntime.dispatch.registry import names_where
from epruntime.layer.moe import EPMoE

GRAPH_SAFE_DISPATCHERS = names_where(graph_safe=True)


class GraphedMoE:
    """One EPMoE layer captured at ``num_tokens`` tokens: ``graphed(x)`` copies ``x`` in and replays."""

    def __init__(self, layer: EPMoE, num_tokens: int, warmup: int = 2) -> None:
        name = layer.dispatcher.name
        if name not in GRAPH_SAFE_DISPATCHERS:
            raise ValueError(
                f"CUDA graph capture needs a fixed-capacity dispatcher ({', '.join(GRAPH_SAFE_DISPATCHERS)}), "
                f"this layer uses {name}; set runtime.dispatcher for the decode path"
            )
        if not (layer.experts.use_grouped_mm or layer.experts.fp8):
            raise ValueError(
                "CUDA graph capture needs a grouped GEMM without host syncs; this layer runs the per-expert loop "
                "(runtime.grouped_gemm: loop, or operands _grouped_mm cannot take); use grouped_gemm auto or grouped_mm"
            )
        if layer.device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs topology.device=cuda, this layer runs on {layer.device}")
        capacity = layer.dispatcher.spec.capacity
        if not 0 < num_tokens <= capacity:
            raise ValueError(f"num_tokens={num_tokens}: capture between 1 and runtime.max_tokens_per_rank={capacity}")
        self.layer = layer
        self.x = torch.zeros(num_tokens, layer.cfg.hidden_size, dtype=layer.cfg.torch_dtype, device=layer.device)
        self.graph = torch.cuda.CUDAGraph()
        # Neither a probe nor the finite check (an all-gather read on the host) belongs in a graph.
        with layer.uninstrumented():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graph requires
                for _ in range(warmup):
                    layer(self.x)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.y = layer(self.x)  # [T, H], rewritten by every replay

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H] (the graph's output buffer)
        """Run the captured forward on ``x``; the result is overwritten by the next call."""
        if x.shape != self.x.shape:
            raise ValueError(f"GraphedMoE: captured for x of shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.graph.replay()
        return self.y
