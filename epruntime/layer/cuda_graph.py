"""CUDA graphs for the decode path: capture one EPMoE forward at a fixed token count, then replay it.

Only the dispatchers the registry declares ``graph_safe`` may be captured (fixed capacity, no host
synchronisation: ``lowlatency``, ``deepep_low_latency``). Inside a capture the masked expert stage
cannot read ``masked_m`` on the host: DeepGEMM's masked kernels read it on the device (FP8 with
``grouped_gemm: deep_gemm``, bf16 where ``deep_gemm`` imports); otherwise the grouped GEMM runs every
slot of ``[E_local, C, H]`` (the padding rows are ignored). The layer runs uninstrumented (no probe, no
finite check) for warm-up and capture.

A replay runs no Python, so what the layer does on the host each call is done here around it: DeepEP's
low-latency area is cleaned when a normal-mode call used the shared buffer since the last low-latency one
(``auto`` or ``deepep`` layers on the same EP world), and the traffic a fixed-capacity backend counts on
the host (``lowlatency``) is added per replay. Device-side counters (``deepep_low_latency``) are updated
by kernels captured in the graph. This module imports without CUDA; capturing needs it.
"""

from __future__ import annotations

from collections import Counter

import torch

from epruntime.dispatch.deepep import DeepEPLowLatencyDispatcher
from epruntime.dispatch.registry import names_where
from epruntime.layer.moe import EPMoE

GRAPH_SAFE_DISPATCHERS = names_where(graph_safe=True)


def check_capturable(layer: EPMoE, num_tokens: int, warmup: int) -> None:
    """Raise a one-line ValueError naming the fix when ``layer`` cannot be captured at ``num_tokens`` tokens."""
    name = layer.dispatcher.name
    if name not in GRAPH_SAFE_DISPATCHERS:
        raise ValueError(
            f"CUDA graph capture needs a fixed-capacity dispatcher ({', '.join(GRAPH_SAFE_DISPATCHERS)}), "
            f"this layer uses {name}; set runtime.dispatcher for the decode path"
        )
    if not layer.experts.graph_safe:
        raise ValueError(
            "CUDA graph capture needs a grouped GEMM without host syncs; this layer runs the per-expert loop "
            f"({layer.experts.loop_reason or 'runtime.grouped_gemm: loop'}); use grouped_gemm auto or grouped_mm "
            "on a GPU torch runs torch._grouped_mm on, or install DeepGEMM"
        )
    if layer.device.type != "cuda":
        raise ValueError(f"CUDA graph capture needs topology.device=cuda, this layer runs on {layer.device}")
    capacity = layer.dispatcher.spec.capacity
    if not 0 < num_tokens <= capacity:
        raise ValueError(f"num_tokens={num_tokens}: capture between 1 and runtime.max_tokens_per_rank={capacity}")
    if warmup < 1:
        raise ValueError(
            f"warmup={warmup}: warm up at least once (DeepEP builds its buffer on first use, never in a graph)"
        )


class GraphedMoE:
    """One EPMoE layer captured at ``num_tokens`` tokens: ``graphed(x)`` copies ``x`` in and replays."""

    def __init__(self, layer: EPMoE, num_tokens: int, warmup: int = 2) -> None:
        check_capturable(layer, num_tokens, warmup)
        self.layer, dispatcher = layer, layer.dispatcher
        self.deepep = dispatcher.buffers if isinstance(dispatcher, DeepEPLowLatencyDispatcher) else None
        self.traffic = dispatcher.traffic
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
            before = Counter(self.traffic.bytes)
            with torch.cuda.graph(self.graph):
                self.y = layer(self.x)  # [T, H], rewritten by every replay
        # What the host counted while capturing moved nothing then; every replay moves it.
        self.replay_bytes = {key: n - before[key] for key, n in self.traffic.bytes.items() if n != before[key]}
        for key, n in self.replay_bytes.items():
            self.traffic.bytes[key] -= n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H] (the graph's output buffer)
        """Run the captured forward on ``x``; the result is overwritten by the next call."""
        if x.shape != self.x.shape:
            raise ValueError(f"GraphedMoE: captured for x of shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        if self.deepep is not None:
            self.deepep.clean_if_dirty()  # DeepEP's low-latency kernels need it after any normal-mode call
        self.graph.replay()
        for key, n in self.replay_bytes.items():
            self.traffic.bytes[key] += n
        return self.y
