"""Load balancing from the command line: record the expert load (``run --expert-load``), place
(``epruntime eplb``), rerun on the placement; ``plan --expert-load`` and ``bench --placements``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epruntime.cli.main import main
from epruntime.config.schema import load_config
from epruntime.eplb import zipf_load
from tests.test_bench import TINY
from tests.test_cli import ROOT, _epruntime

CPU_SIM = str(ROOT / "configs" / "cpu-sim.yaml")
EP32 = str(ROOT / "configs" / "deepseek-v3-ep32.yaml")
ONE_BY_TWO = ["--set", "topology.nnodes=1", "--set", "topology.ranks_per_node=2"]
SKEW = ["--set", "runtime.routing_skew=1.0", "--set", "runtime.iters=3"]


def _load_file(path: Path, layers: int, experts: int, seed: int = 0) -> str:
    """A Zipf(1) load (capped at 1/8, as under top-8 routing) of ``layers`` rows, as ``run --expert-load`` writes."""
    load = (zipf_load(layers, experts, 1.0, seed, cap=1 / 8) * 1e5).round().long()  # [L, E]
    path.write_text(json.dumps({"load": load.tolist()}))
    return str(path)


def test_record_place_rerun_is_verified_and_better_balanced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    load, before, after, placement = (tmp_path / n for n in ("load.json", "run0.json", "run1.json", "p.json"))
    world = [CPU_SIM, *TINY, *ONE_BY_TWO, *SKEW]
    proc = _epruntime("launch", "--config", *world, "--expert-load", str(load), "--json", str(before))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert load: busiest rank / mean" in proc.stdout and f"expert load written to {load}" in proc.stdout
    rows = json.loads(load.read_text())["load"]
    assert len(rows) == 1 and len(rows[0]) == 256
    assert sum(rows[0]) == 3 * 2 * 128 * 8  # iters x ranks x tokens x K, each (token, expert) pair once
    if "heatmap written" in proc.stdout:
        assert load.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    assert main(["eplb", "--config", *world, "--set", "runtime.redundant_experts=16",
                 "--expert-load", str(load), "--out", str(placement)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "272 slots (16 redundant)" in printed and "contiguous  n/a" in printed
    p = json.loads(placement.read_text())
    assert len(p["phy2log"]) == 1 and sorted(set(p["phy2log"][0])) == list(range(256)) and p["slots"] == 272
    assert p["predicted_max_over_mean"]["eplb"]["max"] < 1.01

    proc = _epruntime("launch", "--config", *world, "--set", "runtime.redundant_experts=16",
                      "--set", f"runtime.placement={placement}", "--verify", "--json", str(after))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: ok" in proc.stdout
    b0, b1 = (json.loads(f.read_text())["expert_balance"] for f in (before, after))
    assert sum(b0["recv_pairs_per_rank"]) == sum(b1["recv_pairs_per_rank"]) == 2 * 128 * 8  # per layer call
    assert b1["max_over_mean"] < b0["max_over_mean"]


def test_expert_load_counts_each_token_once_under_expert_tp(tmp_path: Path) -> None:
    """The two ranks of one expert-TP group route the same tokens: the load counts them once."""
    load = tmp_path / "tp.json"
    proc = _epruntime("launch", "--config", CPU_SIM, *TINY, *ONE_BY_TWO, "--set", "runtime.moe_tp=2",
                      "--set", "runtime.iters=2", "--expert-load", str(load))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(json.loads(load.read_text())["load"][0]) == 2 * 128 * 8  # iters x tokens x K, one EP rank


def test_eplb_against_contiguous_without_redundant_slots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    load = _load_file(tmp_path / "load.json", 3, 256)
    assert main(["eplb", "--config", CPU_SIM, "--expert-load", load, "--out", str(out)]) == 0
    assert "256 slots (0 redundant) over 8 EP ranks on 2 node(s), hierarchical" in capsys.readouterr().out
    predicted = json.loads(out.read_text())["predicted_max_over_mean"]
    assert len(predicted["eplb"]["per_layer"]) == 3
    assert predicted["eplb"]["max"] < predicted["contiguous"]["median"]  # a permutation alone already helps


def test_eplb_keeps_replicas_home_under_node_limited_routing(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    limited = ["--set", "model.max_nodes_per_token=2", "--set", "runtime.redundant_experts=32"]
    load = _load_file(tmp_path / "load.json", 2, 256)
    assert main(["eplb", "--config", CPU_SIM, *limited, "--expert-load", load, "--out", str(out)]) == 0
    for row in json.loads(out.read_text())["phy2log"]:
        assert [e // 128 for e in row] == [p // 144 for p in range(288)]  # expert e on node e // 128, slot's node
    cfg = load_config(
        CPU_SIM, ["model.max_nodes_per_token=2", "runtime.redundant_experts=32", f"runtime.placement={out}"]
    )
    assert cfg.runtime.placement == str(out)  # the launch-time check accepts it


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ('{"phy2log": [[0]]}', 'expected {"load": [[...], ...]}'),
        ('{"load": [[1, 2, 3]]}', "row 0 has 3 experts but model.n_routed_experts is 256"),
        ('{"load": [[-1' + ", 0" * 255 + "]]}", "row 0 holds -1; loads are (token, expert) pair counts >= 0"),
    ],
)
def test_bad_load_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str | None, message: str
) -> None:
    load = tmp_path / "load.json"
    if content is not None:
        load.write_text(content)
    for command in (["eplb", "--out", str(tmp_path / "p.json")], ["plan", "--samples", "64"]):
        assert main([*command, "--config", CPU_SIM, "--expert-load", str(load)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"epruntime: error: --expert-load {load}: ") and message in err
        assert err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def test_plan_compares_placements_for_a_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.json"
    load = _load_file(tmp_path / "load.json", 2, 256)
    args = ["plan", "--config", EP32, "--set", "runtime.redundant_experts=32", "--expert-load", load]
    assert main([*args, "--samples", "512", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "288 slots (32 redundant) over 32 EP ranks" in printed and "each redundant expert: 88.1 MB" in printed
    c = json.loads(out.read_text())["expert_load"]
    rows = c["placements"]
    assert list(rows) == ["contiguous", "hierarchical", "global"]
    assert rows["hierarchical"]["policy"] == "hierarchical" and rows["global"]["policy"] == "global"
    for name in ("hierarchical", "global"):  # both far better than contiguous under the load's own model
        assert rows[name]["max_over_mean"]["max"] < rows["contiguous"]["max_over_mean"]["median"] / 2
    for row in rows.values():
        assert row["inter_node_bytes_per_token"]["hierarchical"] > 0 and row["routed_max_over_mean"]["median"] >= 1
    # contiguous keeps every group on its node, as the hierarchical placement does: the same nodes per token
    same = rows["contiguous"]["inter_node_bytes_per_token"]["hierarchical"]
    assert rows["hierarchical"]["inter_node_bytes_per_token"]["hierarchical"] == pytest.approx(same, rel=0.05)
    assert c["bytes_per_redundant_expert"] == 3 * 7168 * 2048 * 2  # bf16 gate, up and down
    assert c["redundant_bytes_per_rank"] == c["bytes_per_redundant_expert"]  # 32 over 32 ranks: one each


def test_plan_sizes_redundant_experts_for_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("safetensors", reason="checkpoints need safetensors: pip install -e '.[models]'")
    from tests.tiny_checkpoints import write_checkpoints

    ckpt = write_checkpoints(tmp_path / "ckpt")["sharded"]  # 16 experts, MoE layers 1 and 2
    out, load = tmp_path / "plan.json", _load_file(tmp_path / "load.json", 2, 16)
    args = ["plan", "--config", CPU_SIM, "--checkpoint", str(ckpt), "--set", "runtime.redundant_experts=8"]
    assert main([*args, "--expert-load", load, "--samples", "128", "--json", str(out)]) == 0
    c = json.loads(out.read_text())["expert_load"]
    assert c["moe_layers"] == 2 and c["redundant_bytes_per_rank"] == 2 * c["bytes_per_redundant_expert"]
    assert c["bytes_per_redundant_expert"] == 3 * 64 * 32 * 4  # fp32 tiny experts
    three = _load_file(tmp_path / "three.json", 3, 16)
    assert main([*args, "--expert-load", three]) == 2  # 3 rows for 2 MoE layers


def test_bench_times_eplb_against_contiguous_in_one_run(tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = _epruntime(
        "bench", "--config", CPU_SIM, *TINY, *ONE_BY_TWO, "--set", "runtime.routing_skew=1.0", "--tokens", "64",
        "--placements", "contiguous,eplb", "--redundant", "16", "--verify", "--reps", "2",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    contiguous, eplb = json.loads(out.read_text())["cases"]
    assert [contiguous["case"]["label"], eplb["case"]["label"]] == [
        "hierarchical/overlap/64/contiguous", "hierarchical/overlap/64/eplb"]  # fmt: skip
    assert eplb["eplb"]["slots"] == 272 and eplb["eplb"]["redundant_experts"] == 16
    assert eplb["ratio_to_contiguous"] == pytest.approx(eplb["timing_ms"]["total"] / contiguous["timing_ms"]["total"])
    assert eplb["max_rel_diff_to_contiguous"] <= 1e-5  # the same layer, other slots
    for case in (contiguous, eplb):
        assert case["verify"]["ok"] and sum(case["expert_balance"]["recv_pairs_per_rank"]) == 2 * 64 * 8
    assert eplb["expert_balance"]["max_over_mean"] <= contiguous["expert_balance"]["max_over_mean"]
    assert "x contiguous" in proc.stdout
    if "plot written" in proc.stdout:
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--placements", "contiguous,best"], "--placements: unknown best; choose from contiguous, eplb"),
        (["--placements", "contiguous,eplb", "--redundant", "3"], "--redundant 3: 256 experts + 3"),
        (["--redundant", "16"], "--redundant: applies to the eplb placement"),
    ],
)
def test_bench_placement_flags_are_checked_before_launching(
    capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    assert main(["bench", "--config", CPU_SIM, *ONE_BY_TWO, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
