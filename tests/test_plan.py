"""``epruntime plan`` sizes a config without launching anything (the EP32 GPU config on this CPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from epruntime.cli import main
from epruntime.config import load_config
from epruntime.plan import make_plan

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
