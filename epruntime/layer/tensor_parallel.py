"""Expert tensor parallelism's weight slices: rank ``r`` of a TP group of ``N`` holds slice ``r % N`` of the
intermediate dimension of every expert its group owns (the groups themselves are built once, in
:mod:`epruntime.parallel.layout`); one all-reduce over the TP group sums the slices' partial outputs."""

from __future__ import annotations

import torch

from epruntime.io.fp8 import Weight, cat_rows, narrow_weight


def _part(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Start and length of part ``tp_rank`` of ``size`` split as ``torch.chunk`` splits it."""
    step = -(-size // tp_size)
    return tp_rank * step, min(step, size - tp_rank * step)


def tp_slice(weight: Weight, dim: int, tp_rank: int, tp_size: int) -> Weight:
    """Slice ``tp_rank`` of ``tp_size`` equal parts of ``weight`` along ``dim`` (contiguous). An FP8 block stays
    one when the slice falls on block edges, and is dequantized to fp32 otherwise (:func:`narrow_weight`)."""
    return narrow_weight(weight, dim, *_part(weight.shape[dim], tp_rank, tp_size))


def tp_slice_gate_up(w13: Weight, tp_rank: int, tp_size: int) -> Weight:
    """``[..., 2I, H]`` (gate rows, then up rows) -> ``[..., 2I/N, H]`` with slice ``tp_rank`` of each half;
    FP8 blocks as in :func:`tp_slice`."""
    half = w13.shape[-2] // 2
    start, length = _part(half, tp_rank, tp_size)
    gate, up = narrow_weight(w13, -2, start, length), narrow_weight(w13, -2, half + start, length)
    return cat_rows([gate, up], torch.float32)
