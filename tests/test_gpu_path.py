"""The GPU path's logic that runs without a GPU: config-time checks, the masked expert stage, graph guards."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from epruntime.config import kernel_limits
from epruntime.config.checks import check_environment
from epruntime.config.schema import ConfigError, config_from_dict
from epruntime.layer import experts as experts_module
from epruntime.layer.cuda_graph import GraphedMoE
from epruntime.layer.experts import LocalExperts, grouped_mm_fits
from epruntime.layer.moe import EPMoE
from epruntime.parallel.health import all_gather_flat
from epruntime.parallel.runtime import init_runtime, process_group_backend, shutdown_runtime
from tests.factories import SMALL_MODEL, make_config, rel_err

ROOT = Path(__file__).resolve().parents[1]


def _gpu_config(dispatcher: str = "deepep", grouped_gemm: str = "auto", **model):
    return config_from_dict(
        {
            "model": {**SMALL_MODEL, "dtype": "bfloat16", "hidden_size": 7168, **model},
            "topology": {"nnodes": 1, "ranks_per_node": 8, "device": "cuda", "backend": "nccl"},
            "runtime": {"dispatcher": dispatcher, "grouped_gemm": grouped_gemm},
        }
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU is visible, so the checks after the GPU check run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("dispatcher", ["deepep", "deepep_low_latency", "auto"])
def test_deepep_missing_fails_at_config_time_saying_how_to_get_it(fake_gpu, monkeypatch, dispatcher: str) -> None:
    monkeypatch.setattr(kernel_limits, "deep_ep_import_error", lambda: "ModuleNotFoundError: No module named 'deep_ep'")
    with pytest.raises(ConfigError) as err:
        check_environment(_gpu_config(dispatcher))
    message = str(err.value)
    assert "\n" not in message and f"runtime.dispatcher: {dispatcher}" in message
    assert "docker/README.md" in message and "flat or lowlatency" in message


def test_deepep_shape_limits_are_config_errors(fake_gpu, monkeypatch) -> None:
    monkeypatch.setattr(kernel_limits, "deep_ep_import_error", lambda: None)
    check_environment(_gpu_config("auto"))  # 8 ranks, hidden 7168, top-4: both modes fit
    with pytest.raises(ConfigError, match="hidden sizes"):
        check_environment(_gpu_config("deepep_low_latency", hidden_size=256))
    check_environment(_gpu_config("deepep", hidden_size=256))  # normal mode takes any hidden size
    cfg = _gpu_config("deepep")
    with pytest.raises(ConfigError, match="8 per node"):
        check_environment(cfg.replace(topology=cfg.topology.__class__(2, 4, "cuda", "nccl")))


def test_deepep_world_and_low_latency_capacity_limits_are_config_errors(fake_gpu, monkeypatch) -> None:
    monkeypatch.setattr(kernel_limits, "deep_ep_import_error", lambda: None)
    monkeypatch.delenv("NVSHMEM_QP_DEPTH", raising=False)
    cfg = _gpu_config("deepep_low_latency")  # 8 ranks
    with pytest.raises(ConfigError, match=r"max_tokens_per_rank=600: .*NVSHMEM_QP_DEPTH \(1024\); use at most 511"):
        check_environment(cfg.replace(runtime=dataclasses.replace(cfg.runtime, max_tokens_per_rank=600)))
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "2048")
    check_environment(cfg.replace(runtime=dataclasses.replace(cfg.runtime, max_tokens_per_rank=600)))
    two = cfg.replace(
        topology=dataclasses.replace(cfg.topology, ranks_per_node=2),
        runtime=dataclasses.replace(cfg.runtime, max_tokens_per_rank=3, tokens_per_rank=3),
    )
    with pytest.raises(ConfigError, match=r"EP world \(2\) x max_tokens_per_rank to be a multiple of 4"):
        check_environment(two)
    big = _gpu_config("deepep_low_latency", n_routed_experts=96)
    twelve = big.replace(
        topology=dataclasses.replace(cfg.topology, nnodes=3, ranks_per_node=8),
        runtime=dataclasses.replace(cfg.runtime, moe_tp=2),
    )
    with pytest.raises(ConfigError, match="below 8 ranks or a multiple of 8, got 12"):
        check_environment(twelve)


@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning")
def test_all_gather_works_on_torch_builds_without_all_gather_single(monkeypatch) -> None:
    rt = init_runtime(make_config())
    try:
        monkeypatch.delattr(dist, "all_gather_single", raising=False)  # GPU images ship torch from before it
        out = torch.zeros(rt.world_size, dtype=torch.int64)
        all_gather_flat(out, torch.tensor([7]))
        assert out.tolist() == [7]
    finally:
        shutdown_runtime()


def test_nccl_process_groups_carry_host_collectives_on_gloo() -> None:
    # count exchanges and timing reductions are CPU tensors: NCCL alone raises on them
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo") == "gloo"


def test_gpu_only_choices_are_rejected_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.dispatcher: deepep runs on GPUs only"):
        make_config(runtime={"dispatcher": "deepep"})
    with pytest.raises(ConfigError, match=r"runtime\.grouped_gemm: deep_gemm runs on GPUs only"):
        make_config(runtime={"grouped_gemm": "deep_gemm"})
    check_environment(make_config(runtime={"dispatcher": "auto"}))  # auto is flat / lowlatency on CPU


def test_deep_gemm_missing_fails_at_config_time(fake_gpu, monkeypatch) -> None:

    monkeypatch.setattr(
        kernel_limits, "deep_gemm_import_error", lambda: "ModuleNotFoundError: No module named 'deep_gemm'"
    )
    with pytest.raises(ConfigError, match=r"deep_gemm needs DeepGEMM.*grouped_gemm=auto"):
        check_environment(_gpu_config("flat", "deep_gemm"))


def test_capacity_is_checked_against_the_batch() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.max_tokens_per_rank: must be positive"):
        make_config(runtime={"max_tokens_per_rank": 0})
    with pytest.raises(ConfigError, match=r"runtime.tokens_per_rank: 300 is more than runtime.max_tokens_per_rank=256"):
        make_config(runtime={"dispatcher": "lowlatency", "tokens_per_rank": 300, "max_tokens_per_rank": 256})
    make_config(runtime={"dispatcher": "auto", "tokens_per_rank": 300, "max_tokens_per_rank": 256})  # prefill


def test_grouped_mm_alignment_rule() -> None:
    cuda = torch.device("cuda")
    assert grouped_mm_fits(torch.float32, torch.device("cpu"), 5, 3)
    assert grouped_mm_fits(torch.bfloat16, cuda, 7168, 2048)
    assert not grouped_mm_fits(torch.float32, cuda, 7168, 2048)  # CUDA grouped_mm is bf16 only
    assert not grouped_mm_fits(torch.bfloat16, cuda, 7168, 20)  # 40-byte rows are not 16-byte aligned


def _masked_reference(x: torch.Tensor, masked_m: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e, m in enumerate(masked_m.tolist()):
        h = x[e, :m].double() @ w13[e].double().t()
        gate, up = h.chunk(2, dim=1)
        out[e, :m] = (F.silu(gate) * up) @ w2[e].double().t()
    return out


@pytest.mark.parametrize("capturing", [False, True])
def test_masked_expert_stage_computes_the_valid_rows(monkeypatch, capturing: bool) -> None:
    """Valid rows only (eager), or every slot as inside a CUDA graph: the valid rows agree either way."""
    monkeypatch.setattr(experts_module, "_capturing", lambda x: capturing)
    cfg = make_config(hidden_size=24, moe_intermediate_size=8)
    gen = torch.Generator().manual_seed(5)
    w13, w2 = torch.randn(3, 16, 24, generator=gen), torch.randn(3, 24, 8, generator=gen)
    x = torch.randn(3, 10, 24, generator=gen)
    masked_m = torch.tensor([4, 0, 10], dtype=torch.int32)
    y = LocalExperts(cfg.model, w13, w2).forward_masked(x, masked_m)
    expected = _masked_reference(x, masked_m, w13, w2)
    assert y.shape == x.shape
    for e, m in enumerate(masked_m.tolist()):
        assert rel_err(y[e, :m], expected[e, :m]) <= 1e-5
    if not capturing:
        assert not y[0, 4:].any() and not y[1].any()  # the eager path leaves padding rows at zero


def test_cuda_graph_helper_refuses_what_it_cannot_capture() -> None:
    cfg = make_config(runtime={"dispatcher": "lowlatency", "max_tokens_per_rank": 4, "tokens_per_rank": 4})
    rt = init_runtime(cfg)
    try:
        layer = EPMoE.random(rt.cfg.model, rt, seed=0)
        with pytest.raises(ValueError, match=r"needs topology\.device=cuda"):
            GraphedMoE(layer, num_tokens=4)
        layer.experts.use_grouped_mm = False  # as with runtime.grouped_gemm: loop, which reads counts on the host
        with pytest.raises(ValueError, match="grouped GEMM without host syncs"):
            GraphedMoE(layer, num_tokens=4)
        layer.dispatcher.name = "flat"  # as a layer built with runtime.dispatcher: flat would be
        with pytest.raises(ValueError, match="needs a fixed-capacity dispatcher"):
            GraphedMoE(layer, num_tokens=4)
    finally:
        shutdown_runtime()


def test_grouped_gemm_benchmark_runs_on_cpu(tmp_path, capsys) -> None:
    """scripts/bench_grouped_gemm.py at tiny shapes: the same code that measures the card on a GPU."""
    spec = importlib.util.spec_from_file_location("bench_grouped_gemm", ROOT / "scripts" / "bench_grouped_gemm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--hidden", "128", "--intermediate", "64", "--experts", "4", "--rows", "64", "512"]
    assert bench.main([*args, "--warmup", "0", "--iters", "1", "--masked-max-rows", "64", "--json", str(out)]) == 0
    assert "expert-stage grouped GEMM on CPU" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in results] == [64, 512] and "masked_tflops" in results[0]
    assert all(r["grouped_tflops"] > 0 and r["dense_tflops"] > 0 for r in results)
