"""FP8 128 x 128 block (de)quantization, blocks kept through stacking and TP slicing, per-token activation scales
and DeepGEMM's contiguous layout, on CPU."""

from __future__ import annotations

import pytest
import torch

from epruntime.dispatch.base import count_tokens_per_expert
from epruntime.io import checkpoint, fp8
from epruntime.io.fp8 import (
    FP8,
    Fp8Block,
    aligned_layout,
    cat_rows,
    dequantize_block_fp8,
    narrow_weight,
    quantize_block_fp8,
    quantize_per_token_fp8,
    stack_weights,
)
from epruntime.layer.experts import LocalExperts
from epruntime.layer.tensor_parallel import tp_slice, tp_slice_gate_up
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


def test_fp8_block_ignores_the_dense_dtype_when_moved() -> None:
    """EPMoE moves every expert weight with ``w.to(device, dtype)``: a block keeps its FP8 bytes and scales (the
    move to a GPU and back is tests/gpu/test_cuda_path.py's)."""
    block = quantize_block_fp8(torch.randn(130, 130))
    moved = block.to("cpu")
    assert isinstance(moved, Fp8Block) and moved.shape == (130, 130) and moved.scale_inv.shape == (2, 2)
    kept = block.to("cpu", torch.bfloat16)  # EPMoE's w.to(device, dtype): the dtype is for dense weights only
    assert kept.weight.dtype == FP8 and kept.scale_inv.dtype == torch.float32 and kept.block == block.block


def _blocks(shape: tuple[int, ...], seed: int) -> Fp8Block:
    gen = torch.Generator().manual_seed(seed)
    return quantize_block_fp8(torch.randn(shape, generator=gen))


def _same_bytes(a: Fp8Block, b: Fp8Block) -> bool:
    return torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)) and torch.equal(a.scale_inv, b.scale_inv)


def _values(w: torch.Tensor | Fp8Block) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, Fp8Block) else w


def test_deep_gemm_keeps_the_checkpoint_blocks() -> None:
    """No second rounding: the FP8 bytes and scales handed in are the ones held (and registered as parameters)."""
    cfg = make_config(hidden_size=256, moe_intermediate_size=128)
    w13, w2 = _blocks((2, 256, 256), 5), _blocks((2, 256, 128), 6)
    experts = LocalExperts(cfg.model, w13, w2, grouped_gemm="deep_gemm")
    assert isinstance(experts.w13, Fp8Block) and isinstance(experts.w2, Fp8Block)
    assert _same_bytes(experts.w13, w13) and _same_bytes(experts.w2, w2)
    assert experts.w13.weight.data_ptr() == w13.weight.data_ptr()  # not even copied
    held = sum(p.numel() * p.element_size() for p in experts.parameters())
    assert held == sum(w.weight.numel() + w.scale_inv.numel() * 4 for w in (w13, w2))
    dense = LocalExperts(cfg.model, w13.dequantize(torch.float32), w2.dequantize(torch.float32), "deep_gemm")
    assert _same_bytes(dense.w13, quantize_block_fp8(w13.dequantize(torch.float32)))  # dense weights: quantized
    odd = Fp8Block(w13.weight, torch.ones(2, 4, 4), (64, 64))
    with pytest.raises(ValueError, match=r"deep_gemm takes float8_e4m3fn weights in 128x128 blocks"):
        LocalExperts(cfg.model, odd, w2, grouped_gemm="deep_gemm")


def test_stack_and_concatenate_keep_whole_blocks() -> None:
    gate, up = _blocks((256, 200), 7), _blocks((256, 200), 8)
    w13 = cat_rows([gate, up], torch.float32)
    assert isinstance(w13, Fp8Block) and w13.shape == (512, 200) and w13.scale_inv.shape == (4, 2)
    assert torch.equal(w13.dequantize(torch.float32), torch.cat([_values(gate), _values(up)]))
    stacked = stack_weights([w13, w13], torch.float32)
    assert isinstance(stacked, Fp8Block) and stacked.scale_inv.shape == (2, 4, 2)
    assert torch.equal(stacked.dequantize(torch.float32)[1], w13.dequantize(torch.float32))
    partial = _blocks((100, 200), 9)  # gate rows ending inside a block row: one block cannot hold both
    mixed = cat_rows([partial, up], torch.bfloat16)
    assert not isinstance(mixed, Fp8Block) and mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, torch.cat([_values(partial), _values(up)]).bfloat16())


@pytest.mark.parametrize(
    ("dim", "start", "length", "stays_fp8"),
    [(-2, 128, 128, True), (-2, 256, 44, True), (-1, 128, 128, True), (0, 1, 1, True), (-2, 64, 128, False)],
)
def test_narrow_slices_weight_and_scales_on_block_edges(dim: int, start: int, length: int, stays_fp8: bool) -> None:
    w = _blocks((2, 300, 256), 10)
    part = narrow_weight(w, dim, start, length)
    assert isinstance(part, Fp8Block) == stays_fp8
    assert torch.equal(_values(part), _values(w).narrow(dim, start, length))
    if stays_fp8:
        assert torch.equal(part.weight.view(torch.uint8), w.weight.narrow(dim, start, length).view(torch.uint8))


@pytest.mark.parametrize(("inter", "tp_size", "stays_fp8"), [(256, 2, True), (512, 4, True), (128, 2, False)])
def test_tp_slices_of_blocks(inter: int, tp_size: int, stays_fp8: bool) -> None:
    """Block-aligned expert-TP slices stay FP8 with their own scales; unaligned ones are dequantized, exactly."""
    w13, w2 = _blocks((2, 2 * inter, 256), 11), _blocks((2, 256, inter), 12)
    d13, d2 = _values(w13), _values(w2)
    for rank in range(tp_size):
        s13, s2 = tp_slice_gate_up(w13, rank, tp_size), tp_slice(w2, -1, rank, tp_size)
        assert isinstance(s13, Fp8Block) == isinstance(s2, Fp8Block) == stays_fp8
        assert torch.equal(_values(s13), tp_slice_gate_up(d13, rank, tp_size))
        assert torch.equal(_values(s2), tp_slice(d2, -1, rank, tp_size))
        assert s13.shape == (2, 2 * inter // tp_size, 256) and s2.shape == (2, 256, inter // tp_size)


def test_sliced_blocks_run_like_sliced_dense_weights() -> None:
    """Unaligned TP slices (a tiny model) through LocalExperts equal the dense path: dequantized exactly once."""
    cfg = make_config(hidden_size=64, moe_intermediate_size=32)
    w13, w2 = _blocks((3, 64, 64), 13), _blocks((3, 64, 32), 14)
    gen = torch.Generator().manual_seed(15)
    x, idx, weights = torch.randn(20, 64, generator=gen), torch.randint(0, 3, (20, 2), generator=gen), torch.rand(20, 2)
    counts = count_tokens_per_expert(idx, 3)
    for rank in range(2):
        fp8_slices = tp_slice_gate_up(w13, rank, 2), tp_slice(w2, -1, rank, 2)
        dense_slices = tp_slice_gate_up(_values(w13), rank, 2), tp_slice(_values(w2), -1, rank, 2)
        got = LocalExperts(cfg.model, *(w.to("cpu", torch.float32) for w in fp8_slices))(x, idx, weights, counts)
        assert torch.equal(got, LocalExperts(cfg.model, *dense_slices)(x, idx, weights, counts))


def test_one_dequantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's, the experts' and the TP slices' dequantization all go through dequantize_block_fp8."""
    assert not hasattr(checkpoint, "dequantize_fp8")
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return dequantize_block_fp8(*args, **kwargs)

    monkeypatch.setattr(fp8, "dequantize_block_fp8", counting)
    w13, w2 = _blocks((2, 256, 128), 16), _blocks((2, 128, 128), 17)
    LocalExperts(make_config(hidden_size=128, moe_intermediate_size=128).model, w13, w2)
    tp_slice(w2, -1, 1, 2)  # 64 of 128 columns: unaligned
    assert calls == [w13.shape, w2.shape, w2.shape]
