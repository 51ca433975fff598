"""One GPU: bf16 grouped GEMM and the masked stage against fp32, DeepGEMM FP8, FP8 blocks moved to the GPU
and back, EPMoE on cuda, CUDA graph replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epruntime.config.kernel_limits import deep_gemm_import_error
from epruntime.config.schema import config_from_dict
from epruntime.dispatch.base import count_tokens_per_expert
from epruntime.io.fp8 import FP8, dequantize_block_fp8, quantize_block_fp8
from epruntime.io.weights import random_state_dict
from epruntime.layer.cuda_graph import GraphedMoE
from epruntime.layer.experts import LocalExperts
from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import init_runtime, shutdown_runtime
from tests.factories import SMALL_MODEL, rel_err
from tests.gpu import requires_cuda

pytestmark = requires_cuda
BF16_TOL = 3e-2


def _cfg(dispatcher: str = "flat", grouped_gemm: str = "auto", **model):
    return config_from_dict(
        {
            "model": {**SMALL_MODEL, "hidden_size": 1024, "moe_intermediate_size": 256, "dtype": "bfloat16", **model},
            "topology": {"device": "cuda", "backend": "nccl"},
            "runtime": {
                "dispatcher": dispatcher,
                "grouped_gemm": grouped_gemm,
                "max_tokens_per_rank": 64,
                "tokens_per_rank": 48,
            },
        }
    )


def _weights(e: int, h: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=gen) / h**0.5, torch.randn(e, h, i, generator=gen) / i**0.5


def _expert_fp32(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:  # one expert, fp32
    gate, up = (x.float() @ w13.float().t()).chunk(2, dim=1)
    return (F.silu(gate) * up) @ w2.float().t()


def _normal_inputs(e: int, h: int, rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, h, generator=gen)
    idx = torch.randint(0, e, (rows, 1), generator=gen)
    idx[: rows // 2] = 1  # a heavy expert; some experts may get nothing
    weights = torch.rand(rows, 1, generator=gen)
    return x, idx, weights


def _normal_reference(x, idx, weights, w13, w2) -> torch.Tensor:
    out = torch.zeros(x.shape)
    for e in range(w13.shape[0]):
        hit = idx[:, 0] == e
        out[hit] = weights[hit] * _expert_fp32(x[hit], w13[e], w2[e])
    return out


def test_bf16_grouped_gemm_matches_fp32() -> None:
    cfg = _cfg()
    w13, w2 = _weights(8, 1024, 256, 0)
    x, idx, weights = _normal_inputs(8, 1024, 1000, 1)
    dev = torch.device("cuda")
    experts = LocalExperts(cfg.model, w13.to(dev, torch.bfloat16), w2.to(dev, torch.bfloat16))
    assert experts.use_grouped_mm  # bf16 with 16-byte aligned rows takes torch._grouped_mm on CUDA
    x16 = x.to(dev, torch.bfloat16)
    y = experts(x16, idx.to(dev), weights.to(dev), count_tokens_per_expert(idx.to(dev), 8))
    ref = _normal_reference(x16.float().cpu(), idx, weights, w13.bfloat16(), w2.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y.cpu(), ref) <= BF16_TOL


@pytest.mark.parametrize("capture", [False, True])
def test_masked_stage_on_cuda(capture: bool) -> None:
    """The masked stage eagerly (valid rows only) and inside a CUDA graph (every slot) match fp32."""
    cfg = _cfg()
    dev = torch.device("cuda")
    w13, w2 = (w.to(dev, torch.bfloat16) for w in _weights(4, 1024, 256, 2))
    experts = LocalExperts(cfg.model, w13, w2)
    x = torch.randn(4, 96, 1024, device=dev, dtype=torch.bfloat16)
    masked_m = torch.tensor([96, 0, 17, 50], dtype=torch.int32, device=dev)
    if capture:
        experts.forward_masked(x, masked_m)  # warm up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = experts.forward_masked(x, masked_m)
        graph.replay()
    else:
        y = experts.forward_masked(x, masked_m)
    for e, m in enumerate(masked_m.tolist()):
        assert rel_err(y[e, :m].cpu(), _expert_fp32(x[e, :m].cpu(), w13[e].cpu(), w2[e].cpu())) <= BF16_TOL


@pytest.mark.skipif(deep_gemm_import_error() is not None, reason="deep_gemm is not importable")
def test_fp8_deep_gemm_matches_dequantized_weights() -> None:
    """DeepGEMM FP8 (contiguous and masked layouts) against fp32 on the same FP8 weights."""
    cfg = _cfg(grouped_gemm="deep_gemm")
    dev = torch.device("cuda")
    w13, w2 = (quantize_block_fp8(w.to(dev)) for w in _weights(8, 1024, 256, 3))
    experts = LocalExperts(cfg.model, w13, w2, grouped_gemm="deep_gemm")
    d13, d2 = (dequantize_block_fp8(w.weight, w.scale_inv, dtype=torch.float32).cpu() for w in (w13, w2))
    x, idx, weights = _normal_inputs(8, 1024, 700, 4)
    x16 = x.to(dev, torch.bfloat16)
    y = experts(x16, idx.to(dev), weights.to(dev), count_tokens_per_expert(idx.to(dev), 8))
    assert rel_err(y.cpu(), _normal_reference(x16.float().cpu(), idx, weights, d13, d2)) <= 5e-2
    xm = torch.randn(8, 64, 1024, device=dev, dtype=torch.bfloat16)
    masked_m = torch.tensor([64, 0, 3, 10, 33, 1, 64, 20], dtype=torch.int32, device=dev)
    ym = experts.forward_masked(xm, masked_m)
    for e, m in enumerate(masked_m.tolist()):
        assert rel_err(ym[e, :m].cpu(), _expert_fp32(xm[e, :m].cpu(), d13[e], d2[e])) <= 5e-2


def test_fp8_block_moves_to_the_gpu_and_back_unchanged() -> None:
    """``Fp8Block.to`` across devices, as EPMoE's ``w.to(device, dtype)`` loads it: FP8 stays FP8 whatever
    dtype is asked, values and scales arrive bit for bit, and the GPU dequantizes them as the host does."""
    block = quantize_block_fp8(torch.randn(130, 260, generator=torch.Generator().manual_seed(6)))
    on_gpu = block.to(torch.device("cuda"), torch.bfloat16)
    assert on_gpu.weight.is_cuda and on_gpu.scale_inv.is_cuda
    assert (on_gpu.weight.dtype, on_gpu.scale_inv.dtype, on_gpu.block) == (FP8, torch.float32, block.block)
    back = on_gpu.to("cpu")
    assert not back.weight.is_cuda and not back.scale_inv.is_cuda
    assert torch.equal(back.weight.view(torch.uint8), block.weight.view(torch.uint8))
    assert torch.equal(back.scale_inv, block.scale_inv)
    assert torch.equal(on_gpu.dequantize(torch.float32).cpu(), block.dequantize(torch.float32))


@pytest.mark.parametrize("dispatcher", ["flat", "lowlatency"])
def test_epmoe_on_one_gpu_matches_reference(dispatcher: str) -> None:
    rt = init_runtime(_cfg(dispatcher))
    try:
        assert rt.device.type == "cuda"
        layer = EPMoE.random(rt.cfg.model, rt, seed=1)
        x = torch.randn(48, 1024, generator=torch.Generator().manual_seed(5)).bfloat16()
        y = layer(x.to(rt.device))
        ref = reference_moe(x, random_state_dict(rt.cfg.model, 1), rt.cfg.model)
        assert y.dtype == torch.bfloat16 and rel_err(y.cpu(), ref) <= BF16_TOL
        if dispatcher == "lowlatency":  # decode: the captured graph replays the eager forward
            graphed = GraphedMoE(layer, num_tokens=48)
            assert rel_err(graphed(x.to(rt.device)).cpu(), y.cpu()) <= 1e-2
    finally:
        shutdown_runtime()
