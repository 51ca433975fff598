"""``epruntime plan`` sizes a config without launching anything (the EP32 GPU config on this CPU machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from epruntime.cli.main import main
from epruntime.cli.plan import make_plan, weight_bytes
from epruntime.config.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
EP32 = str(ROOT / "configs" / "deepseek-v3-ep32.yaml")


def test_plan_ep32_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", EP32, "--samples", "1024", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not dist.is_initialized()  # nothing was launched
    assert "32 ranks = 4 nodes x 8" in printed and "node 3: experts 192-255, groups 6-7" in printed
    assert "r31: 248-255" in printed and "inter-node bytes per token" in printed
    plan = json.loads(out.read_text())
    assert plan["weight_bytes_per_rank"]["routed_experts"] == 8 * 3 * 7168 * 2048 * 2  # 8 bf16 experts
    assert plan["weight_bytes_per_rank"]["shared_expert"] == 3 * 7168 * 2048 * 2
    flat, hier = plan["traffic_bytes"]["flat"], plan["traffic_bytes"]["hierarchical"]
    assert 0 < hier["inter_node"] < flat["inter_node"]  # one row per remote node instead of per remote rank
    assert flat["dispatch"]["inter_node"] == flat["combine"]["inter_node"]
    assert all(v > 0 for v in plan["dispatch_buffer_bytes_per_rank"].values())


def test_node_limit_and_single_node_in_plan() -> None:
    limited = make_plan(load_config(EP32, ["model.max_nodes_per_token=2"]), samples=1024)
    unlimited = make_plan(load_config(EP32), samples=1024)
    assert limited["mean_nodes_per_token"] <= 2 < unlimited["mean_nodes_per_token"]
    per_token = "inter_node_bytes_per_token"
    assert limited[per_token]["hierarchical"] < unlimited[per_token]["hierarchical"]
    one_node = make_plan(load_config(ROOT / "configs" / "deepseek-v3-ep8.yaml"), samples=256)
    assert all(t["inter_node"] == 0 < t["intra_node"] for t in one_node["traffic_bytes"].values())


def test_weight_sizes_follow_fp8_and_tensor_parallelism() -> None:
    h, i = 7168, 2048
    fp8 = weight_bytes(load_config(EP32, ["runtime.grouped_gemm=deep_gemm"]))
    scales = 4 * ((2 * i // 128) * (h // 128) + (h // 128) * (i // 128))  # one fp32 per 128 x 128 block
    assert fp8["routed_experts"] == 8 * (3 * h * i + scales)  # e4m3: one byte per weight
    tp = weight_bytes(load_config(EP32, ["runtime.moe_tp=2", "runtime.shared_expert_tp=2"]))
    assert tp["routed_experts"] == 16 * 3 * h * (i // 2) * 2  # twice the experts, half of each
    assert tp["shared_expert"] == 3 * h * i * 2 // 2


def test_plan_sizes_a_checkpoint_per_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("safetensors", reason="checkpoints need safetensors: pip install -e '.[models]'")
    from safetensors import safe_open

    from tests.tiny_checkpoints import TINY, write_checkpoints

    ckpt = write_checkpoints(tmp_path / "ckpt")["sharded"]
    out = tmp_path / "plan.json"
    cpu_sim = str(ROOT / "configs" / "cpu-sim.yaml")
    assert main(["plan", "--config", cpu_sim, "--checkpoint", str(ckpt), "--samples", "256", "--json", str(out)]) == 0
    assert f"checkpoint {ckpt}" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["experts_per_rank"] == TINY["n_routed_experts"] // 8  # the model is the checkpoint's
    routed, replicated = [0] * 8, 0  # from every shard's headers: 4-byte elements, expert e on rank e // 2
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                size = 4 * math.prod(f.get_slice(key).get_shape())
                if ".mlp.experts." in key:
                    routed[int(key.split(".mlp.experts.")[1].split(".")[0]) // 2] += size
                else:
                    replicated += size
    expected = [{"routed_experts": r, "replicated": replicated, "total": r + replicated} for r in routed]
    assert plan["checkpoint"]["weight_bytes_per_rank"] == expected
