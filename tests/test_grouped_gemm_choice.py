"""Which kernel the expert stage runs, and the DeepGEMM calls it makes, without a GPU.

``torch._grouped_mm`` is chosen from the GPU's compute capability and the torch version (a monkeypatched
``torch.cuda.get_device_capability``); the masked layout takes DeepGEMM's bf16 masked kernel where it can;
a recording stand-in for ``deep_gemm`` (:mod:`tests.standins`, fp32 on the CPU) shows the calls: the FP8
contiguous layout built once for both GEMMs, the masked kernels, and the warm-up that runs them all once.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from epruntime.dispatch.base import count_tokens_per_expert
from epruntime.io.fp8 import dequantize_block_fp8, quantize_block_fp8
from epruntime.layer import experts as experts_module
from epruntime.layer.experts import LocalExperts, deep_gemm_masked_unusable, grouped_mm_unusable
from tests.factories import make_config, rel_err
from tests.standins import Recorder, make_deep_gemm

CUDA = torch.device("cuda")
H, I, E = 256, 128, 4


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "deep_gemm", make_deep_gemm(recorder))
    return recorder


def _capability(monkeypatch: pytest.MonkeyPatch, major: int, minor: int, version: str = "2.13.0") -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch, "__version__", version)


@pytest.mark.parametrize(
    ("capability", "version", "reason"),
    [
        ((9, 0), "2.8.0", None),
        ((10, 0), "2.8.0+cu128", "runs torch._grouped_mm on SM90 only, this GPU is SM100"),  # refused before 2.9
        ((8, 0), "2.8.0", "runs torch._grouped_mm on SM90 only, this GPU is SM80"),
        ((9, 0), "2.13.0", None),
        ((10, 3), "2.10.0a0+git", None),
        ((8, 9), "2.13.0", "on SM89 as a loop that reads the offsets on the host"),  # the fallback: no graph
        ((12, 0), "2.13.0", "on SM120 as a loop that reads the offsets on the host"),
    ],
)
def test_grouped_mm_follows_the_gpu_and_torch(monkeypatch, capability, version, reason) -> None:
    _capability(monkeypatch, *capability, version)
    got = grouped_mm_unusable(CUDA)
    if reason is None:
        assert got is None
    else:
        assert reason in got and version in got and "\n" not in got
    assert grouped_mm_unusable(torch.device("cpu")) is None  # torch's CPU kernel


def test_without_grouped_mm_auto_loops_saying_why_and_forcing_it_fails(monkeypatch) -> None:
    monkeypatch.delattr(torch, "_grouped_mm")
    cfg = make_config(hidden_size=H, moe_intermediate_size=I).model
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    experts = LocalExperts(cfg, w13, w2)
    assert not experts.use_grouped_mm and "has no torch._grouped_mm" in experts.loop_reason
    assert experts.kernels()["normal"].startswith("per-expert loop (torch ")
    with pytest.raises(ValueError, match=r"runtime\.grouped_gemm: grouped_mm: torch .* has no torch\._grouped_mm"):
        LocalExperts(cfg, w13, w2, grouped_gemm="grouped_mm")
    assert LocalExperts(cfg, w13, w2, grouped_gemm="loop").loop_reason == "runtime.grouped_gemm: loop"


def test_masked_kernel_choice(monkeypatch, rec: Recorder) -> None:
    _capability(monkeypatch, 9, 0)
    assert deep_gemm_masked_unusable(CUDA, torch.bfloat16, 7168, 2048) is None  # an H200 with deep_gemm
    _capability(monkeypatch, 8, 0)
    assert "this GPU is SM80" in deep_gemm_masked_unusable(CUDA, torch.bfloat16, 7168, 2048)
    _capability(monkeypatch, 9, 0)
    assert "bf16" in deep_gemm_masked_unusable(CUDA, torch.float32, 7168, 2048)
    assert "multiples of 128" in deep_gemm_masked_unusable(CUDA, torch.bfloat16, 7168, 200)
    assert "on cpu" in deep_gemm_masked_unusable(torch.device("cpu"), torch.bfloat16, 7168, 2048)
    monkeypatch.setattr(experts_module, "deep_gemm_import_error", lambda: "ModuleNotFoundError: deep_gemm")
    assert "import deep_gemm failed" in deep_gemm_masked_unusable(CUDA, torch.bfloat16, 7168, 2048)


def _masked_reference(x, masked_m, w13, w2) -> torch.Tensor:  # fp32, valid rows only
    out = torch.zeros(x.shape)
    for e, m in enumerate(masked_m.tolist()):
        gate, up = (x[e, :m].float() @ w13[e].float().t()).chunk(2, dim=1)
        out[e, :m] = (F.silu(gate) * up) @ w2[e].float().t()
    return out


def test_bf16_masked_layout_runs_deep_gemms_masked_kernel(rec: Recorder) -> None:
    gen = torch.Generator().manual_seed(0)
    w13, w2 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16(), (torch.randn(E, H, I) / I**0.5).bfloat16()
    experts = LocalExperts(make_config(hidden_size=H, moe_intermediate_size=I).model, w13, w2)
    experts.masked_reason = None  # as chosen on an SM90 GPU where deep_gemm imports
    x = torch.randn(E, 32, H, generator=gen).bfloat16()
    masked_m = torch.tensor([32, 0, 5, 17], dtype=torch.int32)
    y = experts.forward_masked(x, masked_m)
    expected_m = -(-32 * 4 // 16)  # ceil(C * top-k / routed experts) of the small model (top-4 of 16)
    assert rec.log == [
        ("bf16_masked", (E, 32, H), (E, 2 * I, H), torch.int32, expected_m),
        ("bf16_masked", (E, 32, I), (E, H, I), torch.int32, expected_m),
    ]
    assert experts.graph_safe and experts.kernels()["masked"] == "DeepGEMM bf16 masked"
    expected = _masked_reference(x, masked_m, w13, w2)
    for e, m in enumerate(masked_m.tolist()):
        assert rel_err(y[e, :m], expected[e, :m]) <= 3e-2


def test_fp8_contiguous_layout_is_built_once_for_both_gemms(rec: Recorder) -> None:
    gen = torch.Generator().manual_seed(1)
    w13, w2 = quantize_block_fp8(torch.randn(E, 2 * I, H, generator=gen)), quantize_block_fp8(torch.randn(E, H, I))
    experts = LocalExperts(make_config(hidden_size=H, moe_intermediate_size=I).model, w13, w2, "deep_gemm")
    x = torch.randn(50, H, generator=gen).bfloat16()
    idx = torch.randint(-1, E, (50, 2), generator=gen)
    weights = torch.rand(50, 2, generator=gen)
    y = experts(x, idx, weights, count_tokens_per_expert(idx, E))
    calls = rec.calls("fp8_contiguous")
    assert len(calls) == 2 and calls[0][1][0] == calls[1][1][0]  # one padded layout [M_pad, *] for gate/up and down
    assert calls[0][1] == (calls[0][1][0], H) and calls[1][1] == (calls[0][1][0], I)
    d13, d2 = (dequantize_block_fp8(w.weight, w.scale_inv, dtype=torch.float32) for w in (w13, w2))
    expected = torch.zeros(50, H)
    for r in range(50):
        for k in range(2):
            if idx[r, k] >= 0:
                gate, up = (x[r].float() @ d13[idx[r, k]].t()).chunk(2)
                expected[r] += weights[r, k] * ((F.silu(gate) * up) @ d2[idx[r, k]].t())
    assert rel_err(y, expected) <= 6e-2


def test_warm_up_runs_every_kernel_of_each_layout_once(rec: Recorder) -> None:
    w13, w2 = quantize_block_fp8(torch.randn(E, 2 * I, H)), quantize_block_fp8(torch.randn(E, H, I))
    experts = LocalExperts(make_config(hidden_size=H, moe_intermediate_size=I).model, w13, w2, "deep_gemm")
    experts.warm_up(normal_rows=300, masked_capacity=64)
    assert rec.names() == ["fp8_contiguous", "fp8_contiguous", "fp8_masked", "fp8_masked"]
    assert rec.log[2][1] == (E, 64, H)
    rec.log.clear()
    experts.warm_up(masked_capacity=16)  # only the layouts this layer's dispatcher gives
    assert rec.names() == ["fp8_masked", "fp8_masked"]
    bf16 = LocalExperts(
        make_config(hidden_size=H, moe_intermediate_size=I).model, *(w.dequantize(torch.float32) for w in (w13, w2))
    )
    bf16.warm_up(normal_rows=10, masked_capacity=8)  # the torch kernels on the CPU: nothing to compile, no error
