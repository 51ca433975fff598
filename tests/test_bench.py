"""``epruntime bench`` end to end on tiny shapes: what it measures and writes, not how fast it is."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from epruntime.cli.bench import expert_flops
from epruntime.cli.instruments import StageTimer
from epruntime.cli.measure import interleaved_medians
from epruntime.layer.probe import STAGES
from tests.test_cli import _epruntime

TINY = ["--set", "model.hidden_size=64", "--set", "model.moe_intermediate_size=32", "--set", "runtime.warmup=1"]


def test_interleaved_medians_times_each_contender_reps_times_in_turns() -> None:
    calls: list[str] = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians = interleaved_medians(contenders, 5, torch.device("cpu"), 3)
    # each turn: one untimed call, then up to 3 timed ones; 5 timed calls = turns of 3 and 2
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 3 + ["b"] * 3
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def test_stage_timer_tells_cpu_time_from_waiting() -> None:
    timer = StageTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.layer("moe layer"):
            with timer.stage("dispatch"):  # waiting, as a rank does in a collective
                time.sleep(0.05)
            with timer.stage("experts"):  # computing
                end = time.process_time() + 0.05
                while time.process_time() < end:
                    pass
    wall, cpu = timer.medians_ms(), timer.cpu_medians_ms()
    assert wall["dispatch"] >= 50 and cpu["dispatch"] < 10
    assert cpu["experts"] >= 50 and wall["experts"] >= cpu["experts"] * 0.9
    assert wall["total"] >= wall["dispatch"] + wall["experts"] and cpu["total"] >= cpu["experts"]
    assert wall["router"] == cpu["router"] == 0.0  # never entered


def test_expert_flops_counts_gate_up_and_down_gemms() -> None:
    assert expert_flops(pairs=3, hidden=5, intermediate=7) == 2 * 3 * 5 * 14 + 2 * 3 * 7 * 5


def test_one_rank_bench_times_transformers_in_the_same_run(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the peers are transformers' DeepseekV3MoE: pip install -e '.[dev]'")
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -e '.[dev]'")
    out, png = tmp_path / "one.json", tmp_path / "one.png"
    proc = _epruntime(
        "bench", "--config", "configs/bench-1rank.yaml", *TINY, "--tokens", "32,64", "--reps", "3",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 1 and report["reps"] == 3
    assert [c["case"]["tokens_per_rank"] for c in report["cases"]] == [32, 64]
    for case in report["cases"]:
        assert set(case["timing_ms"]) == set(STAGES) and case["timing_ms"]["total"] > 0
        assert 0 < case["fraction_of_dense"] and case["expert_gflops"] > 0 and case["dense_gflops"] > 0
        peers = case["peers"]
        fastest = min(peers[impl]["total_ms"] for impl in ("eager", "grouped_mm"))
        assert peers["speedup_vs_fastest"] == pytest.approx(fastest / peers["epruntime_ms"])
    assert "vs transformers eager" in proc.stdout and "vs transformers grouped_mm" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_many_rank_bench_sweeps_dispatchers_and_modes_against_one_rank(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    proc = _epruntime(
        "bench", "--config", "configs/cpu-sim.yaml", *TINY, "--set", "topology.ranks_per_node=2",
        "--tokens", "16", "--dispatchers", "flat,hierarchical", "--shared", "overlap,serial",
        "--single-rank-baseline", "--reps", "4", "--json", str(out), "--plot", "",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 4 and report["reps"] == 4
    labels = [c["case"]["label"] for c in report["cases"]]
    assert labels == ["flat/overlap/16", "flat/serial/16", "hierarchical/overlap/16", "hierarchical/serial/16"]
    per_token = {c["case"]["dispatcher"]: c["traffic_bytes_per_token"]["inter_node"] for c in report["cases"]}
    assert 0 < per_token["hierarchical"] <= per_token["flat"]  # a token crosses to a node once at most
    for case in report["cases"]:
        assert case["single_rank_ms"] > 0
        assert case["ratio_to_single_rank"] == pytest.approx(case["timing_ms"]["total"] / case["single_rank_ms"])
        cpu = case["cpu_ms_all_ranks"]  # summed over the 4 ranks: each computes in every stage it times
        assert set(cpu) == set(STAGES) and cpu["total"] >= cpu["experts"] > 0 and case["single_rank_cpu_ms"] > 0
    assert proc.stdout.count("vs one rank, same total tokens") == 4
    assert proc.stdout.count("host CPU ms per layer, all ranks: router") == 4


def test_bench_runs_the_masked_dispatchers(tmp_path: Path) -> None:
    """lowlatency (and auto at decode sizes) hand the expert stage a masked layout; the bench drives it through
    the layer's own entry, so it measures them too (it used to fail on the missing tokens_per_expert)."""
    out = tmp_path / "ll.json"
    proc = _epruntime(
        "bench", "--config", "configs/cpu-sim.yaml", *TINY, "--set", "topology.ranks_per_node=1",
        "--set", "runtime.max_tokens_per_rank=16", "--tokens", "16", "--dispatchers", "lowlatency,auto",
        "--shared", "overlap", "--reps", "2", "--json", str(out), "--plot", "",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"]["dispatcher"] for c in cases] == ["lowlatency", "auto"]
    for case in cases:
        assert case["timing_ms"]["experts"] > 0 and case["expert_gflops"] > 0 and case["fraction_of_dense"] > 0


def test_bench_sweeps_micro_batches_with_time_and_peak_memory(tmp_path: Path) -> None:
    out = tmp_path / "mb.json"
    proc = _epruntime(
        "bench", "--config", "configs/cpu-sim.yaml", *TINY, "--set", "topology.ranks_per_node=1",
        "--tokens", "16", "--micro-batches", "1,4", "--reps", "2", "--json", str(out), "--plot", "",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [c["case"]["micro_batches"] for c in cases] == [1, 4]
    assert [c["case"]["label"].rsplit("/", 1)[-1] for c in cases] == ["16", "mb4"]
    assert all(c["peak_bytes"] > 0 and c["timing_ms"]["total"] > 0 for c in cases)
    bad = _epruntime("bench", "--config", "configs/cpu-sim.yaml", "--micro-batches", "0,2")
    assert bad.returncode == 2 and "--micro-batches '0,2': each must be >= 1" in bad.stderr
