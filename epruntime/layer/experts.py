"""This rank's routed experts: permute (row, k) pairs to expert order, grouped GEMM, weighted reduce.

Both dispatch layouts run the same SwiGLU over expert-contiguous rows (:meth:`LocalExperts.swiglu`):
the normal layout (one row per received token, local top-k ids) is permuted into expert order and
weighted back per row; the masked low-latency layout (``[E_local, C, H]`` with ``masked_m`` valid
rows per expert) runs on its valid rows and returns unweighted outputs (its combine weights them).
On CUDA ``torch._grouped_mm`` needs bf16 operands whose rows are 16-byte aligned; other shapes and
dtypes take the per-expert loop. With ``grouped_gemm: deep_gemm`` the weights are FP8 blocks and
the GEMMs are DeepGEMM's (see :mod:`epruntime.io.fp8`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from epruntime.config.schema import MoEConfig
from epruntime.dispatch.base import DispatchResult, MaskedDispatchResult
from epruntime.io.fp8 import (
    BLOCK,
    FP8,
    Fp8Block,
    Weight,
    deep_gemm_grouped_contiguous,
    deep_gemm_grouped_masked,
    dense,
    quantize_block_fp8,
)
from epruntime.layer.activation import swiglu


def has_grouped_mm() -> bool:
    """Whether this torch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fits(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` takes operands with rows of ``dims`` elements: on CUDA it needs bf16
    and 16-byte aligned strides (the transposed weight ``[E, D_in, D_out]`` has stride ``D_in``)."""
    return device.type != "cuda" or (dtype == torch.bfloat16 and all(d * 2 % 16 == 0 for d in dims))


def valid_rows(masked_m: torch.Tensor, capacity: int) -> torch.Tensor:  # [N] int64
    """Flat indices into ``[E, capacity]`` of each expert's first ``masked_m[e]`` rows, expert-major."""
    slots = torch.arange(capacity, device=masked_m.device)
    return (slots.unsqueeze(0) < masked_m.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)


def _deep_gemm_block(w: Weight) -> Fp8Block:
    """The FP8 128 x 128 block DeepGEMM takes: an FP8 block as it is (no second rounding), a dense weight
    quantized."""
    if not isinstance(w, Fp8Block):
        return quantize_block_fp8(w)
    if w.block != BLOCK or w.weight.dtype != FP8:
        raise ValueError(
            f"runtime.grouped_gemm: deep_gemm takes float8_e4m3fn weights in {BLOCK[0]}x{BLOCK[1]} blocks, the "
            f"checkpoint has {w.weight.dtype} in {w.block[0]}x{w.block[1]} blocks; set runtime.grouped_gemm=auto"
        )
    return w


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def grouped_linear(
    x: torch.Tensor,  # [N, D_in] rows in expert-contiguous order
    w: torch.Tensor,  # [E, D_out, D_in] one weight per expert (nn.Linear layout)
    counts: torch.Tensor,  # [E] int64 rows per expert
    use_grouped_mm: bool,
) -> torch.Tensor:  # [N, D_out]
    """Per-expert ``x_e @ w_e.T`` over consecutive row blocks; one kernel when grouped_mm is used."""
    if x.shape[0] == 0:  # a rank that received nothing: no kernel to launch
        return x.new_empty(0, w.shape[1])
    if use_grouped_mm:
        offs = torch.cumsum(counts, dim=0).to(torch.int32)  # [E] end offset of each expert's rows
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start : start + n], w[e].t(), out=out[start : start + n])
        start += n
    return out


class LocalExperts(nn.Module):
    """The ``E_local`` SwiGLU experts this rank owns, stored stacked for grouped GEMM.

    ``w13``/``w2`` may be FP8 blocks (:class:`~epruntime.io.fp8.Fp8Block`): kept as they are for
    ``grouped_gemm: deep_gemm`` (their tensors registered as parameters, so ``parameters()`` and
    ``state_dict()`` hold them), dequantized here once to ``cfg.torch_dtype`` otherwise; dense weights
    are quantized to 128 x 128 blocks at load for ``deep_gemm``.
    """

    def __init__(self, cfg: MoEConfig, w13: Weight, w2: Weight, grouped_gemm: str = "auto") -> None:
        super().__init__()
        self.intermediate = w2.shape[-1]  # I, or I / moe_tp for an expert-TP slice
        self.topk, self.total_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.fp8 = grouped_gemm == "deep_gemm"
        if self.fp8:  # [E_local, 2I, H] and [E_local, H, I] FP8 blocks for DeepGEMM
            self.w13, self.w2 = (
                self._register_block(name, _deep_gemm_block(w)) for name, w in (("w13", w13), ("w2", w2))
            )
            self.use_grouped_mm = False
            return
        w13, w2 = dense(w13, cfg.torch_dtype), dense(w2, cfg.torch_dtype)
        self.w13 = nn.Parameter(w13, requires_grad=False)  # [E_local, 2I, H] gate rows then up rows
        self.w2 = nn.Parameter(w2, requires_grad=False)  # [E_local, H, I]
        fits = grouped_mm_fits(w13.dtype, w13.device, w13.shape[-1], self.intermediate)
        if grouped_gemm == "grouped_mm" and not fits:
            raise ValueError(
                f"runtime.grouped_gemm: grouped_mm on CUDA needs bf16 weights with hidden ({w13.shape[-1]}) and "
                f"intermediate ({self.intermediate}) sizes that are multiples of 8; use grouped_gemm auto or loop"
            )
        self.use_grouped_mm = grouped_gemm == "grouped_mm" or (grouped_gemm == "auto" and has_grouped_mm() and fits)

    def _register_block(self, name: str, w: Fp8Block) -> Fp8Block:
        """``w`` with its tensors held as parameters ``{name}_weight`` / ``{name}_scale_inv`` (same storage)."""
        weight = nn.Parameter(w.weight, requires_grad=False)
        scale_inv = nn.Parameter(w.scale_inv, requires_grad=False)
        self.register_parameter(f"{name}_weight", weight)
        self.register_parameter(f"{name}_scale_inv", scale_inv)
        return Fp8Block(weight, scale_inv, w.block)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def _linear(self, x: torch.Tensor, w: Weight, counts: torch.Tensor) -> torch.Tensor:  # [N, D_in] -> [N, D_out]
        if isinstance(w, Fp8Block):
            return deep_gemm_grouped_contiguous(x, w, counts)
        return grouped_linear(x, w, counts, self.use_grouped_mm)

    def swiglu(
        self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:  # [N, H] expert-contiguous -> [N, H]
        """Every expert's SwiGLU on its consecutive block of ``counts[e]`` rows, each row scaled by
        ``weights [N]`` when given (applied to the ``[N, I]`` activation: the down projection is linear)."""
        act = swiglu(self._linear(x, self.w13, counts))  # [N, I]
        if weights is not None:  # cast the [N] weights, not the [N, I] product: a mixed-dtype mul_ is ~5x slower
            act.mul_(weights.to(act.dtype).unsqueeze(1))
        return self._linear(act, self.w2, counts)

    def run(self, result: DispatchResult | MaskedDispatchResult) -> torch.Tensor:
        """The expert stage for either dispatch layout: ``[R, H]`` weighted, or ``[E_local, C, H]`` unweighted."""
        if isinstance(result, MaskedDispatchResult):
            return self.forward_masked(result.recv_x, result.masked_m)
        return self(result.recv_x, result.recv_topk_idx, result.recv_topk_weights, result.tokens_per_expert)

    def forward_masked(
        self,
        recv_x: torch.Tensor,  # [E_local, C, H]
        masked_m: torch.Tensor,  # [E_local] valid rows per expert
    ) -> torch.Tensor:  # [E_local, C, H] unweighted outputs; rows past masked_m[e] are unspecified
        """The masked grouped GEMM of the low-latency layout: only each expert's valid rows count."""
        e, c, h = recv_x.shape
        if self.fp8:  # DeepGEMM's masked kernels read masked_m on the GPU: no host sync
            expected_m = math.ceil(c * self.topk / self.total_experts)
            act = swiglu(deep_gemm_grouped_masked(recv_x, self.w13, masked_m, expected_m))  # [E_local, C, I]
            return deep_gemm_grouped_masked(act, self.w2, masked_m, expected_m)
        flat = recv_x.reshape(e * c, h)  # [E_local * C, H]
        if _capturing(recv_x):  # a CUDA graph cannot read masked_m on the host: run every slot, ignore the rest
            full = torch.full((e,), c, dtype=torch.int64, device=recv_x.device)
            return self.swiglu(flat, full).view(e, c, h)
        rows = valid_rows(masked_m, c)  # [N]
        out = torch.zeros_like(flat)
        out[rows] = self.swiglu(flat[rows], masked_m)
        return out.view(e, c, h)

    def forward(
        self,
        recv_x: torch.Tensor,  # [R, H]
        recv_topk_idx: torch.Tensor,  # [R, K] local ids, -1 elsewhere
        recv_topk_weights: torch.Tensor,  # [R, K] fp32
        tokens_per_expert: torch.Tensor,  # [E_local]
    ) -> torch.Tensor:  # [R, H] weighted sum of this rank's experts per received row
        k = recv_topk_idx.shape[1]
        flat_idx = recv_topk_idx.reshape(-1)  # [R*K]
        # Pairs pointing elsewhere (-1) sort last under key E_local and are cut off.
        keys = torch.where(flat_idx >= 0, flat_idx, self.num_experts)
        num_pairs = int(tokens_per_expert.sum())
        pair = torch.argsort(keys, stable=True)[:num_pairs]  # [N] (row, k) pairs in expert order
        rows = torch.div(pair, k, rounding_mode="floor")  # [N]
        xs = torch.index_select(recv_x, 0, rows)  # [N, H] expert-contiguous copies of the received rows
        out = self.swiglu(xs, tokens_per_expert, recv_topk_weights.reshape(-1)[pair])  # [N, H] weighted
        del xs
        # Each row sums its (at most K) local pairs in the activation dtype, as transformers does;
        # combine sums the ranks' rows in fp32.
        return torch.zeros_like(recv_x).index_add_(0, rows, out)  # [R, H]
