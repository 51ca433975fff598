"""Run work beside the routed path's communication: an alternate CUDA stream on GPU.

On CPU the work runs inline; the overlap comes from the collectives having been issued with
``async_op=True`` before it starts (gloo moves the data on its own threads meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SideStream:
    """Launch ``fn`` on a side stream (GPU) or inline (CPU); ``join`` makes its result usable."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def launch(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Start ``fn`` after the work already queued on the current stream; return its (future) output."""
        if self.stream is None:
            return fn()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        out.record_stream(torch.cuda.current_stream())  # the main stream reads it later
        return out

    def join(self) -> None:
        """Make the main stream wait for everything launched on the side stream."""
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
