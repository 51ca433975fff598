"""FP8 128 x 128 block (de)quantization, per-token activation scales and DeepGEMM's contiguous layout, on CPU."""

from __future__ import annotations

import pytest
import torch

from epruntime.dispatch.base import count_tokens_per_expert
from epruntime.io.fp8 import (
    FP8,
    Fp8Block,
    aligned_layout,
    dequantize_block_fp8,
    quantize_block_fp8,
    quantize_per_token_fp8,
)
from epruntime.layer.experts import LocalExperts
from tests.factories import make_config, rel_err


def _random_fp8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(FP8)


@pytest.mark.parametrize("shape", [(256, 384), (3, 130, 200)])
def test_dequantize_multiplies_each_block_by_its_scale(shape: tuple[int, ...]) -> None:
    """Checked element by element against an explicit loop over blocks, edge blocks included."""
    weight = _random_fp8(shape, 0)
    nb, kb = -(-shape[-2] // 128), -(-shape[-1] // 128)
    scale_inv = torch.rand(*shape[:-2], nb, kb, generator=torch.Generator().manual_seed(1)) + 0.01
    out = dequantize_block_fp8(weight, scale_inv, dtype=torch.float32)
    expected = weight.float().clone()
    for i in range(nb):
        for j in range(kb):
            expected[..., i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale_inv[..., i, j, None, None]
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert dequantize_block_fp8(weight, scale_inv).dtype == torch.bfloat16  # the default dtype


def test_dequantize_rejects_scales_of_another_block_size() -> None:
    with pytest.raises(ValueError, match=r"needs \[\.\.\., 2, 3\]"):
        dequantize_block_fp8(_random_fp8((256, 384), 0), torch.ones(4, 6))


def test_block_quantize_round_trip_within_fp8_precision() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2, 300, 260, generator=gen) * torch.logspace(-3, 1, 260)  # blocks of very different ranges
    q = quantize_block_fp8(w)
    assert q.weight.dtype == FP8 and q.scale_inv.shape == (2, 3, 3)
    back = dequantize_block_fp8(q.weight, q.scale_inv, dtype=torch.float32)
    blocks = torch.nn.functional.pad(w, (0, 124, 0, 84)).view(2, 3, 128, 3, 128)
    block_amax = blocks.abs().amax(dim=(2, 4))  # [2, 3, 3]
    bound = torch.repeat_interleave(torch.repeat_interleave(block_amax, 128, 1), 128, 2)[:, :300, :260]
    # e4m3 keeps 3 mantissa bits: each element within 2^-4 of itself, or of the block's subnormal spacing
    assert ((back - w).abs() <= w.abs() / 16 + bound / 448 * 2**-9 * 1.01).all()
    assert torch.equal(quantize_block_fp8(back).weight.float(), q.weight.float())  # re-quantizing is stable


def test_per_token_quantization_round_trip() -> None:
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    x[2] = 0.0  # an all-zero token keeps a finite scale
    q, scale = quantize_per_token_fp8(x)
    assert q.shape == (5, 300) and scale.shape == (5, 3) and torch.isfinite(scale).all()
    back = q.float() * torch.repeat_interleave(scale, 128, dim=1)[:, :300]
    assert rel_err(back, x) <= 2**-4


def test_aligned_layout_for_deep_gemm() -> None:
    dest, m_indices = aligned_layout(torch.tensor([3, 0, 5, 4]), alignment=4)
    assert dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12, 13, 14, 15]
    assert m_indices.dtype == torch.int32
    assert m_indices.tolist() == [0, 0, 0, -1, 2, 2, 2, 2, 2, -1, -1, -1, 3, 3, 3, 3]


def test_fp8_expert_weights_are_dequantized_at_load_without_deep_gemm() -> None:
    cfg = make_config(hidden_size=256, moe_intermediate_size=128)
    gen = torch.Generator().manual_seed(4)
    w13 = quantize_block_fp8(torch.randn(2, 256, 256, generator=gen) / 16)
    w2 = quantize_block_fp8(torch.randn(2, 256, 128, generator=gen) / 16)
    dense = [dequantize_block_fp8(w.weight, w.scale_inv, dtype=torch.float32) for w in (w13, w2)]
    x = torch.randn(9, 256, generator=gen)
    idx = torch.randint(0, 2, (9, 1), generator=gen)
    weights = torch.rand(9, 1, generator=gen)
    counts = count_tokens_per_expert(idx, 2)
    from_fp8 = LocalExperts(cfg.model, w13, w2)
    assert isinstance(from_fp8.w13, torch.nn.Parameter) and from_fp8.w13.dtype == torch.float32
    expected = LocalExperts(cfg.model, *dense)(x, idx, weights, counts)
    assert torch.equal(from_fp8(x, idx, weights, counts), expected)


def test_fp8_block_moves_between_devices() -> None:
    block = quantize_block_fp8(torch.randn(130, 130))
    moved = block.to("cpu")
    assert isinstance(moved, Fp8Block) and moved.shape == (130, 130) and moved.scale_inv.shape == (2, 2)
