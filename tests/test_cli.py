"""The ``epruntime`` command end to end: ``launch`` starts real ranks, ``run`` alone is a 1-rank world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _epruntime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "epruntime", *args], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT
    )


def test_launch_cpu_sim_verifies_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    proc = _epruntime(
        "launch",
        "--config",
        "configs/cpu-sim.yaml",
        "--set",
        "runtime.iters=3",
        "--set",
        "runtime.seed=5",
        "--verify",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: ok" in proc.stdout
    assert proc.stdout.count("epruntime run:") == 1  # one summary, from rank 0
    assert "[rank 7]" in proc.stderr  # per-rank lines carry the rank
    summary = json.loads(out.read_text())
    assert (summary["world_size"], summary["nnodes"]) == (8, 2)
    assert summary["verify"]["ok"] and summary["verify"]["max_rel_err"] <= 1e-5
    assert set(summary["timing_ms"]) == {"router", "dispatch", "experts", "combine", "shared", "total"}
    assert summary["throughput_tokens_per_s"] > 0
    traffic = summary["traffic_bytes"]
    assert traffic["inter_node"] > 0 and traffic["intra_node"] > 0
    assert traffic["dispatch"]["inter_node"] == traffic["combine"]["inter_node"]  # one row back per row sent
    assert summary["dispatcher"] == summary["config"]["runtime"]["dispatcher"]


def test_run_without_launcher_is_one_rank_world(tmp_path: Path) -> None:
    out = tmp_path / "one.json"
    proc = _epruntime(
        "run", "--config", "configs/cpu-sim.yaml", "--set", "runtime.iters=2", "--verify", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running a 1-rank world" in proc.stderr
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 1 and summary["verify"]["ok"]
    assert summary["traffic_bytes"]["inter_node"] == summary["traffic_bytes"]["intra_node"] == 0
