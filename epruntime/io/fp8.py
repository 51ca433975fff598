"""FP8 e4m3 with 128 x 128 block scales (DeepSeek-V3's checkpoint format) and DeepGEMM's FP8 grouped GEMMs.

A block-quantized weight ``[..., N, K]`` (float8_e4m3fn) comes with ``scale_inv [..., ceil(N/128),
ceil(K/128)]`` fp32: the real value of every element is ``weight * scale_inv`` of its block (the
checkpoint's ``weight_scale_inv`` is that multiplier, and DeepGEMM takes it as the weight's scale
factor as is). Activations for DeepGEMM are quantized per token and 128 channels (1 x 128 groups).
Quantization, dequantization and the contiguous-layout arithmetic run on CPU; the DeepGEMM calls (FP8
contiguous and masked, and the bf16 masked kernel the low-latency layout uses without FP8) need a Hopper
(SM90) GPU and the ``deep_gemm`` package.

A checkpoint's routed-expert weights travel as :class:`Fp8Block` from the reader to the experts,
stacked, concatenated and TP-sliced by :func:`stack_weights`, :func:`cat_rows` and
:func:`narrow_weight`, which keep the blocks whenever a cut falls on block edges;
:func:`dequantize_block_fp8` is the package's one dequantizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
TOKEN_GROUP = 128  # channels per activation scale (DeepGEMM's 1 x 128 recipe)


@dataclass
class Fp8Block:
    """A block-quantized weight: FP8 values and the fp32 multiplier of each ``block`` (rows x columns)."""

    weight: torch.Tensor  # [..., N, K] float8_e4m3fn
    scale_inv: torch.Tensor  # [..., ceil(N/bn), ceil(K/bk)] fp32
    block: tuple[int, int] = BLOCK  # (bn, bk)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Fp8Block:
        """The same weight on ``device``. ``dtype`` is ignored: FP8 stays FP8 (so ``w.to(device, dtype)``
        moves dense weights and FP8 blocks alike)."""
        return Fp8Block(self.weight.to(device), self.scale_inv.to(device), self.block)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:  # [..., N, K] dtype
        """The real values, through :func:`dequantize_block_fp8`."""
        return dequantize_block_fp8(self.weight, self.scale_inv, self.block, dtype)


Weight = torch.Tensor | Fp8Block


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as a dense tensor: an FP8 block dequantized to ``dtype``, a tensor as it is."""
    return w.dequantize(dtype) if isinstance(w, Fp8Block) else w


def _blocks(parts: Sequence[Weight]) -> list[Fp8Block] | None:
    """``parts`` when all are FP8 blocks of one block size, else None."""
    if all(isinstance(p, Fp8Block) for p in parts) and len({p.block for p in parts}) == 1:
        return list(parts)
    return None


def stack_weights(parts: Sequence[Weight], dtype: torch.dtype) -> Weight:  # [n, ...]
    """``parts`` stacked along a new first dim: one FP8 block (scales stacked alike) when all are blocks of one
    block size, else a dense tensor (blocks dequantized to ``dtype``)."""
    blocks = _blocks(parts)
    if blocks is None:
        return torch.stack([dense(p, dtype) for p in parts])
    w = torch.stack([b.weight for b in blocks])
    return Fp8Block(w, torch.stack([b.scale_inv for b in blocks]), blocks[0].block)


def cat_rows(parts: Sequence[Weight], dtype: torch.dtype) -> Weight:  # [..., sum N_i, K]
    """``parts`` concatenated along rows (dim -2): one FP8 block (scales concatenated alike) when all are blocks
    of one block size and each but the last ends on a block row, else a dense tensor (blocks dequantized to
    ``dtype``)."""
    blocks = _blocks(parts)
    if blocks is None or any(b.shape[-2] % b.block[0] for b in blocks[:-1]):
        return torch.cat([dense(p, dtype) for p in parts], dim=-2)
    w = torch.cat([b.weight for b in blocks], dim=-2)
    return Fp8Block(w, torch.cat([b.scale_inv for b in blocks], dim=-2), blocks[0].block)


def narrow_weight(w: Weight, dim: int, start: int, length: int) -> Weight:
    """``w``'s ``[start, start + length)`` along ``dim``, contiguous. An FP8 block stays one (its scales sliced
    alike) when the slice starts on a block edge and ends on one or at the end; otherwise it is dequantized to
    fp32 first (exact: every FP8 value times its fp32 scale)."""
    if not isinstance(w, Fp8Block):
        return w.narrow(dim, start, length).contiguous()
    axis = dim % w.weight.dim()
    size = ((1,) * (w.weight.dim() - 2) + w.block)[axis]  # leading (expert) dims: one scale per index
    end = start + length
    if start % size or (end % size and end != w.shape[axis]):
        return w.dequantize(torch.float32).narrow(axis, start, length).contiguous()
    first, last = start // size, math.ceil(end / size)
    weight = w.weight.narrow(axis, start, length).contiguous()
    return Fp8Block(weight, w.scale_inv.narrow(axis, first, last - first).contiguous(), w.block)


def _block_view(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[..., N, K]`` zero-padded to whole blocks, viewed as ``[..., N/bn, bn, K/bk, bk]``."""
    (n, k), (bn, bk) = x.shape[-2:], block
    padded = torch.nn.functional.pad(x, (0, -k % bk, 0, -n % bn))
    return padded.view(*x.shape[:-2], padded.shape[-2] // bn, bn, padded.shape[-1] // bk, bk)


def dequantize_block_fp8(
    weight: torch.Tensor,  # [..., N, K] float8_e4m3fn
    scale_inv: torch.Tensor,  # [..., ceil(N/bn), ceil(K/bk)] fp32
    block: tuple[int, int] = BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [..., N, K] dtype
    """Real values of a block-quantized weight: every ``bn x bk`` block times its ``scale_inv``, in fp32."""
    n, k = weight.shape[-2:]
    nb, kb = math.ceil(n / block[0]), math.ceil(k / block[1])
    if scale_inv.shape[-2:] != (nb, kb):
        raise ValueError(
            f"dequantize_block_fp8: scale_inv has shape {tuple(scale_inv.shape)} but a {n}x{k} weight in "
            f"{block[0]}x{block[1]} blocks needs [..., {nb}, {kb}]; check weight_block_size"
        )
    blocks = _block_view(weight.float(), block) * scale_inv.float()[..., :, None, :, None]
    return blocks.flatten(-4, -3).flatten(-2, -1)[..., :n, :k].to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> Fp8Block:
    """Quantize ``[..., N, K]`` to FP8 with one scale per ``bn x bk`` block (the block's amax maps to 448)."""
    n, k = weight.shape[-2:]
    blocks = _block_view(weight.float(), block)  # [..., nb, bn, kb, bk]
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-12) / FP8_MAX  # [..., nb, 1, kb, 1]
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-4, -3).flatten(-2, -1)[..., :n, :k]
    return Fp8Block(q.contiguous(), scale[..., :, 0, :, 0].contiguous(), block)


def quantize_per_token_fp8(x: torch.Tensor, group: int = TOKEN_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> FP8 ``[M, K]`` and fp32 scales ``[M, ceil(K/group)]`` (one per token and ``group`` channels)."""
    m, k = x.shape
    groups = torch.nn.functional.pad(x.float(), (0, -k % group)).view(m, -1, group)  # [M, kb, group]
    scale = groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-4) / FP8_MAX  # [M, kb, 1]
    q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, -1)[:, :k]
    return q.contiguous(), scale.squeeze(2)


def aligned_layout(counts: torch.Tensor, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's contiguous layout for expert-sorted rows with ``counts [E]`` per expert.

    Returns where each row goes (``dest [N]``) in a buffer whose expert segments start at multiples of
    ``alignment``, and that buffer's ``m_indices [M_pad]`` int32: the expert of each row, -1 on padding.
    """
    counts = counts.long()
    padded = torch.div(counts + alignment - 1, alignment, rounding_mode="floor") * alignment  # [E]
    start = torch.cumsum(padded, 0) - padded  # [E] first buffer row of each expert
    first = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    expert = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)  # [N]
    rank_in_expert = torch.arange(len(expert), device=counts.device) - first[expert]  # [N]
    dest = start[expert] + rank_in_expert  # [N]
    m_indices = torch.full((int(padded.sum()),), -1, dtype=torch.int32, device=counts.device)
    m_indices[dest] = expert.to(torch.int32)
    return dest, m_indices


def deep_gemm_alignment() -> int:
    """The M alignment of every expert's segment in DeepGEMM's contiguous layout (``aligned_layout``'s)."""
    import deep_gemm

    return deep_gemm.get_mk_alignment_for_contiguous_layout()


def deep_gemm_aligned_contiguous(
    x: torch.Tensor,  # [M_pad, K] bf16 rows already in DeepGEMM's contiguous layout, padding rows zero
    w: Fp8Block,  # [E, D_out, K]
    m_indices: torch.Tensor,  # [M_pad] int32 expert of each row, -1 on padding (see aligned_layout)
) -> torch.Tensor:  # [M_pad, D_out] bf16, padding rows unspecified
    """Per-expert ``x_e @ w_e.T`` through ``deep_gemm.m_grouped_fp8_gemm_nt_contiguous`` on rows laid out by the
    caller once for all its GEMMs (no re-layout here)."""
    import deep_gemm

    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        quantize_per_token_fp8(x), (w.weight, w.scale_inv), out, m_indices, disable_ue8m0_cast=True
    )
    return out


MaskedRows = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [E, C, K] bf16, or (FP8 [E, C, K], fp32 [E, C, K/128])


def deep_gemm_grouped_masked(
    x: MaskedRows,  # rows past masked_m[e] are ignored; an FP8 pair (DeepEP's FP8 dispatch) is taken as it is
    w: Fp8Block,  # [E, D_out, K]
    masked_m: torch.Tensor,  # [E] int32 valid rows per expert
    expected_m: int,  # typical valid rows per expert (a tuning hint)
) -> torch.Tensor:  # [E, C, D_out] bf16, rows past masked_m[e] unspecified
    """Per-expert ``x_e[:m_e] @ w_e.T`` through ``deep_gemm.m_grouped_fp8_gemm_nt_masked``: no host sync. bf16
    rows are quantized per token and 128 channels first; DeepEP's FP8 pair (scales MN-major) goes in as is."""
    import deep_gemm

    if isinstance(x, tuple):
        q, scale = x
    else:
        e, c, k = x.shape
        q, scale = (t.view(e, c, -1) for t in quantize_per_token_fp8(x.reshape(e * c, k)))
    out = torch.empty(*q.shape[:2], w.shape[1], dtype=torch.bfloat16, device=q.device)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(
        (q, scale), (w.weight, w.scale_inv), out, masked_m.to(torch.int32), max(1, expected_m), disable_ue8m0_cast=True
    )
    return out


def deep_gemm_bf16_masked(
    x: torch.Tensor,  # [E, C, K] bf16, rows past masked_m[e] ignored
    w: torch.Tensor,  # [E, D_out, K] bf16
    masked_m: torch.Tensor,  # [E] int32 valid rows per expert
    expected_m: int,  # typical valid rows per expert (a tuning hint)
) -> torch.Tensor:  # [E, C, D_out] bf16, rows past masked_m[e] unspecified
    """Per-expert ``x_e[:m_e] @ w_e.T`` through ``deep_gemm.m_grouped_bf16_gemm_nt_masked``: only the valid rows
    are computed, and ``masked_m`` is read on the device (CUDA-graph safe)."""
    import deep_gemm

    out = torch.empty(*x.shape[:2], w.shape[1], dtype=torch.bfloat16, device=x.device)
    deep_gemm.m_grouped_bf16_gemm_nt_masked(x.contiguous(), w, out, masked_m.to(torch.int32), max(1, expected_m))
    return out
