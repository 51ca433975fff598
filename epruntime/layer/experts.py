"""This rank's routed experts: permute (row, k) pairs to expert order, grouped GEMM, weighted reduce.

Both dispatch layouts run the same SwiGLU over expert-contiguous rows (:meth:`LocalExperts.swiglu`):
the normal layout (one row per received token, local top-k ids) is permuted into expert order and
weighted back per row; the masked low-latency layout (``[E_local, C, H]`` with ``masked_m`` valid
rows per expert) returns unweighted outputs (its combine weights them).

Kernels: ``torch._grouped_mm`` where torch runs its own kernel for this GPU (:func:`grouped_mm_unusable`
says why not, in one line), else a per-expert loop. The masked layout runs DeepGEMM's bf16 masked kernel
where it imports (only the valid rows, ``masked_m`` read on the device), else the grouped GEMM over the
valid rows (eager) or every slot (inside a CUDA graph). With ``grouped_gemm: deep_gemm`` the weights are
FP8 blocks and every GEMM is DeepGEMM's (see :mod:`epruntime.io.fp8`); the masked stage then also takes
DeepEP's FP8 dispatch as it arrives. DeepGEMM compiles its kernels on first use: :meth:`LocalExperts.warm_up`
does it before the first dispatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from epruntime.config.kernel_limits import deep_gemm_import_error
from epruntime.config.schema import MoEConfig
from epruntime.dispatch.base import DispatchResult, MaskedDispatchResult
from epruntime.io.fp8 import (
    BLOCK,
    FP8,
    Fp8Block,
    MaskedRows,
    Weight,
    aligned_layout,
    deep_gemm_aligned_contiguous,
    deep_gemm_alignment,
    deep_gemm_bf16_masked,
    deep_gemm_grouped_masked,
    dense,
    quantize_block_fp8,
)
from epruntime.layer.activation import swiglu

GROUPED_MM_MAJORS = (9, 10)  # SM90, SM100: torch's CUTLASS grouped GEMM, offsets read on the device (torch >= 2.9)
DEEP_GEMM_MAJORS = (9, 10)  # the architectures DeepGEMM's bf16 masked kernel is built for at the pinned commit


def has_grouped_mm() -> bool:
    """Whether this torch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def grouped_mm_unusable(device: torch.device) -> str | None:
    """Why ``torch._grouped_mm`` is not used on ``device`` (one line), or None when it is. On CUDA, torch before
    2.9 refuses it below and above SM90; later torch runs other GPUs through a loop that copies the offsets to
    the host (a sync per call, and an error inside a CUDA graph capture)."""
    if not has_grouped_mm():
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    sm = f"SM{major}{minor}"
    if _torch_version() < (2, 9) and major != 9:
        return f"torch {torch.__version__} runs torch._grouped_mm on SM90 only, this GPU is {sm}"
    if major not in GROUPED_MM_MAJORS:
        return f"torch {torch.__version__} runs torch._grouped_mm on {sm} as a loop that reads the offsets on the host"
    return None


def grouped_mm_fits(dtype: torch.dtype, device: torch.device, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` takes operands with rows of ``dims`` elements: on CUDA it needs bf16
    and 16-byte aligned strides (the transposed weight ``[E, D_in, D_out]`` has stride ``D_in``)."""
    return device.type != "cuda" or (dtype == torch.bfloat16 and all(d * 2 % 16 == 0 for d in dims))


def deep_gemm_masked_unusable(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int) -> str | None:
    """Why the masked layout does not run DeepGEMM's bf16 masked kernel (one line), or None when it does."""
    if device.type != "cuda":
        return f"DeepGEMM runs on CUDA, the experts are on {device.type}"
    if dtype != torch.bfloat16:
        return f"DeepGEMM's masked kernel takes bf16 weights, these are {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in DEEP_GEMM_MAJORS:
        return f"DeepGEMM's masked kernel is built for SM90 and SM100, this GPU is SM{major}{minor}"
    if hidden % 128 or intermediate % 128:
        return f"DeepGEMM needs hidden ({hidden}) and intermediate ({intermediate}) sizes that are multiples of 128"
    reason = deep_gemm_import_error()
    return None if reason is None else f"import deep_gemm failed ({reason})"


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


def _scale_rows(act: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:  # [N, I] in place
    """``act`` with each row times its weight; cast the ``[N]`` weights, not the ``[N, I]`` product (a mixed-dtype
    ``mul_`` is ~5x slower)."""
    return act if weights is None else act.mul_(weights.to(act.dtype).unsqueeze(1))


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


MaskedGemm = Callable[[MaskedRows, Weight, torch.Tensor, int], torch.Tensor]


class LocalExperts(nn.Module):
    """The ``E_local`` SwiGLU experts this rank owns, stored stacked for grouped GEMM.

    ``w13``/``w2`` may be FP8 blocks (:class:`~epruntime.io.fp8.Fp8Block`): kept as they are for
    ``grouped_gemm: deep_gemm`` (their tensors registered as parameters, so ``parameters()`` and
    ``state_dict()`` hold them), dequantized here once to ``cfg.torch_dtype`` otherwise; dense weights
    are quantized to 128 x 128 blocks at load for ``deep_gemm``. ``loop_reason`` / ``masked_reason`` say
    in one line why the grouped GEMM or DeepGEMM's masked kernel is not used (None when it is).
    """

    def __init__(self, cfg: MoEConfig, w13: Weight, w2: Weight, grouped_gemm: str = "auto") -> None:
        super().__init__()
        self.hidden, self.intermediate = w13.shape[-1], w2.shape[-1]  # H; I, or I / moe_tp for an expert-TP slice
        self.dtype = cfg.torch_dtype  # of the activations
        self.topk, self.total_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.fp8 = grouped_gemm == "deep_gemm"
        self.use_grouped_mm, self.loop_reason, self.masked_reason = False, None, None
        if self.fp8:  # [E_local, 2I, H] and [E_local, H, I] FP8 blocks for DeepGEMM
            self.w13, self.w2 = (
                self._register_block(name, _deep_gemm_block(w)) for name, w in (("w13", w13), ("w2", w2))
            )
            return
        w13, w2 = dense(w13, cfg.torch_dtype), dense(w2, cfg.torch_dtype)
        self.w13 = nn.Parameter(w13, requires_grad=False)  # [E_local, 2I, H] gate rows then up rows
        self.w2 = nn.Parameter(w2, requires_grad=False)  # [E_local, H, I]
        if grouped_gemm == "loop":
            self.loop_reason = self.masked_reason = "runtime.grouped_gemm: loop"
            return
        reason = grouped_mm_unusable(w13.device)
        if reason is None and not grouped_mm_fits(w13.dtype, w13.device, self.hidden, self.intermediate):
            reason = (
                f"torch._grouped_mm on CUDA needs bf16 weights with hidden ({self.hidden}) and intermediate "
                f"({self.intermediate}) sizes that are multiples of 8"
            )
        if grouped_gemm == "grouped_mm" and reason is not None:
            raise ValueError(f"runtime.grouped_gemm: grouped_mm: {reason}; use grouped_gemm auto or loop")
        self.use_grouped_mm, self.loop_reason = reason is None, reason
        self.masked_reason = deep_gemm_masked_unusable(w13.device, w13.dtype, self.hidden, self.intermediate)

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

    @property
    def device(self) -> torch.device:
        return self.w13.weight.device if self.fp8 else self.w13.device

    @property
    def graph_safe(self) -> bool:
        """Whether the masked stage reads nothing on the host (so it can be captured in a CUDA graph)."""
        return self.fp8 or self.use_grouped_mm or self.masked_reason is None

    def kernels(self) -> dict[str, str]:
        """What runs each layout, in words (with the reason where the faster kernel is not used)."""
        if self.fp8:
            return {"normal": "DeepGEMM FP8 contiguous", "masked": "DeepGEMM FP8 masked"}
        grouped = "torch._grouped_mm" if self.use_grouped_mm else f"per-expert loop ({self.loop_reason})"
        masked = "DeepGEMM bf16 masked" if self.masked_reason is None else f"{grouped} ({self.masked_reason})"
        return {"normal": grouped, "masked": masked}

    def swiglu(
        self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:  # [N, H] expert-contiguous -> [N, H]
        """Every expert's SwiGLU on its consecutive block of ``counts[e]`` rows, each row scaled by
        ``weights [N]`` when given (applied to the ``[N, I]`` activation: the down projection is linear)."""
        if self.fp8:
            return self._swiglu_deep_gemm(x, counts, weights)
        act = _scale_rows(swiglu(grouped_linear(x, self.w13, counts, self.use_grouped_mm)), weights)  # [N, I]
        return grouped_linear(act, self.w2, counts, self.use_grouped_mm)

    def _swiglu_deep_gemm(self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """:meth:`swiglu` on DeepGEMM's contiguous layout, laid out once for both GEMMs: every expert's rows start
        at a multiple of DeepGEMM's M alignment, the padding rows are zero (their scales stay regular)."""
        if x.shape[0] == 0:  # a rank that received nothing: no kernel to launch
            return x.new_empty(0, self.hidden)
        dest, m_indices = aligned_layout(counts, deep_gemm_alignment())  # [N], [M_pad]
        padded = x.new_zeros(len(m_indices), x.shape[1])  # [M_pad, H]
        padded[dest] = x
        act = swiglu(deep_gemm_aligned_contiguous(padded, self.w13, m_indices))  # [M_pad, I]
        if weights is not None:
            act = _scale_rows(act, torch.zeros(len(m_indices), device=x.device).index_copy_(0, dest, weights.float()))
        return deep_gemm_aligned_contiguous(act, self.w2, m_indices)[dest]  # [N, H]

    def run(self, result: DispatchResult | MaskedDispatchResult) -> torch.Tensor:
        """The expert stage for either dispatch layout: ``[R, H]`` weighted, or ``[E_local, C, H]`` unweighted."""
        if isinstance(result, MaskedDispatchResult):
            return self.forward_masked(result.recv_x, result.masked_m)
        return self(result.recv_x, result.recv_topk_idx, result.recv_topk_weights, result.tokens_per_expert)

    def _masked_kernel(self, x: MaskedRows, masked_m: torch.Tensor, gemm: MaskedGemm) -> torch.Tensor:
        """Both GEMMs through a masked kernel that reads ``masked_m`` on the GPU (no host sync, graph safe)."""
        capacity = (x[0] if isinstance(x, tuple) else x).shape[1]
        expected_m = math.ceil(capacity * self.topk / self.total_experts)  # rows a balanced expert gets
        act = swiglu(gemm(x, self.w13, masked_m, expected_m))  # [E_local, C, I]
        return gemm(act, self.w2, masked_m, expected_m)

    def forward_masked(
        self,
        recv_x: MaskedRows,  # [E_local, C, H]; with DeepEP's FP8 dispatch the (FP8, fp32 scales) pair
        masked_m: torch.Tensor,  # [E_local] valid rows per expert
    ) -> torch.Tensor:  # [E_local, C, H] unweighted outputs; rows past masked_m[e] are unspecified
        """The masked grouped GEMM of the low-latency layout: only each expert's valid rows count."""
        if self.fp8:
            return self._masked_kernel(recv_x, masked_m, deep_gemm_grouped_masked)
        if isinstance(recv_x, tuple):
            raise TypeError("an FP8 dispatch needs runtime.grouped_gemm: deep_gemm (FP8 experts) to take its rows")
        if self.masked_reason is None:
            return self._masked_kernel(recv_x, masked_m, deep_gemm_bf16_masked)
        e, c, h = recv_x.shape
        flat = recv_x.reshape(e * c, h)  # [E_local * C, H]
        if _capturing(recv_x):  # a CUDA graph cannot read masked_m on the host: run every slot, ignore the rest
            full = torch.full((e,), c, dtype=torch.int64, device=recv_x.device)
            return self.swiglu(flat, full).view(e, c, h)
        rows = valid_rows(masked_m, c)  # [N]
        out = torch.zeros_like(flat)
        out[rows] = self.swiglu(flat[rows], masked_m)
        return out.view(e, c, h)

    @torch.no_grad()
    def warm_up(self, normal_rows: int = 0, masked_capacity: int = 0) -> None:
        """Run every kernel of the layouts this stage will see once, on zero rows: ``normal_rows`` expert-contiguous
        rows spread over the experts (the normal layout) and ``[E_local, masked_capacity, H]`` with every slot
        valid (the masked layout); 0 skips a layout. DeepGEMM compiles each kernel on its first call (seconds to
        minutes): run this before the first dispatch, so no compile happens while DeepEP's peers wait (~100 s)."""
        e, device = self.num_experts, self.device
        if normal_rows > 0:
            counts = torch.full((e,), normal_rows // e, dtype=torch.int64, device=device)  # [E_local]
            counts[: normal_rows % e] += 1
            self.swiglu(torch.zeros(normal_rows, self.hidden, dtype=self.dtype, device=device), counts)
        if masked_capacity > 0:
            x = torch.zeros(e, masked_capacity, self.hidden, dtype=self.dtype, device=device)  # [E_local, C, H]
            self.forward_masked(x, torch.full((e,), masked_capacity, dtype=torch.int32, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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
