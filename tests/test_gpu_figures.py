"""scripts/gpu_figures.py and scripts/gpu_check.sh on the CPU: every figure writes valid JSON, skipping what
needs a GPU with the reason; the device script records every step and gathers the figures even when one
step fails; the scripts run from a checkout where epruntime is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_figures", ROOT / "scripts" / "gpu_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour; a GPU runs the real one")

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3" failures="1" skipped="1">
<testcase classname="tests.gpu.test_cuda_path" name="test_bf16_grouped_gemm_matches_fp32" time="1.0"/>
<testcase classname="tests.gpu.test_deepep" name="test_deepep_layer_equals_flat" time="0.0">
<skipped type="pytest.skip" message="needs 2 CUDA GPUs, 1 visible"/></testcase>
<testcase classname="tests.gpu.test_cuda_path" name="test_masked_stage_on_cuda[True]" time="0.5">
<failure message="AssertionError: rel err 0.2">trace</failure></testcase>
</testsuite></testsuites>
"""


def _run(section: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{section}.json"
    assert figures.main([section, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_without_a_gpu_each_figure_says_so(tmp_path: Path) -> None:
    env = _run("env", tmp_path)
    assert env["torch"] == torch.__version__ and env["skipped"] == figures.NO_GPU and env["gpus"] == []
    assert set(env["epruntime"]) == {"deep_ep", "deep_gemm"}
    for section in ("masked", "layer"):
        assert _run(section, tmp_path) == {"dry_run": False, "skipped": figures.NO_GPU}


def test_dry_run_measures_on_the_cpu_and_skips_the_graphs_with_reasons(tmp_path: Path) -> None:
    masked = _run("masked", tmp_path, "--dry-run")
    assert masked["eager_valid_rows_ms"] > 0 and masked["valid_rows"] == 64 and masked["slots"] == 4 * 32
    assert masked["captured"].startswith("skipped: a CUDA graph needs CUDA")
    layer = _run("layer", tmp_path, "--dry-run")
    assert layer["flat"]["class"] == "LocalDispatcher"  # one rank: flat moves nothing
    for name in ("flat", "lowlatency"):
        assert layer[name]["serial_ms"] > 0 and layer[name]["overlap_ms"] > 0
    assert layer["lowlatency"]["micro_batches_2_overlap_ms"] > 0
    assert layer["graph"].startswith("skipped: a CUDA graph needs CUDA")


def test_a_failing_figure_is_written_as_its_error(tmp_path: Path, monkeypatch) -> None:
    def broken(dry_run: bool, iters: int) -> dict:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(figures, "masked_figures", broken)
    out = tmp_path / "masked.json"
    assert figures.main(["masked", "--json", str(out)]) == 1
    written = json.loads(out.read_text())
    assert written["error"] == "RuntimeError: CUDA error: out of memory" and written["traceback"]


def test_collect_gathers_steps_figures_and_the_junit_summary(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("env\t0\t2\t30\npytest\t1\t40\t130\nlayer\t124\t110\t110\n")
    (tmp_path / "env.json").write_text(json.dumps({"torch": "2.9.0"}))
    (tmp_path / "masked.json").write_text("{not json")
    (tmp_path / "pytest.xml").write_text(JUNIT)
    report = figures.collect(tmp_path)
    assert [s["step"] for s in report["steps"]] == ["env", "pytest", "layer"] and report["steps"][2]["rc"] == 124
    assert report["env"] == {"torch": "2.9.0"} and "error" in report["masked"] and "layer" not in report
    assert not report["ok"]
    pytest_summary = report["pytest"]
    assert (pytest_summary["passed"], pytest_summary["failed"], pytest_summary["skipped"]) == (1, 1, 1)
    assert pytest_summary["tests"][1] == {
        "test": "tests.gpu.test_deepep::test_deepep_layer_equals_flat",
        "outcome": "skipped",
        "message": "needs 2 CUDA GPUs, 1 visible",
    }


def _gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_check.sh needs coreutils' timeout")
def test_gpu_check_without_a_gpu_records_the_environment_and_exits_2(tmp_path: Path) -> None:
    result = _gpu_check(tmp_path)
    assert result.returncode == 2 and "no CUDA GPU visible" in result.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["env", "cuda"] and not report["ok"]
    assert report["env"]["skipped"] == figures.NO_GPU


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_check.sh needs coreutils' timeout")
def test_gpu_check_dry_run_runs_every_step_and_keeps_going_after_a_failure(tmp_path: Path) -> None:
    result = _gpu_check(tmp_path, GPU_CHECK_DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["env", "pytest", "grouped_gemm", "masked", "layer"]
    assert report["ok"] and report["grouped_gemm"]["results"] and report["layer"]["flat"]["serial_ms"] > 0
    failing = _gpu_check(tmp_path, GPU_CHECK_DRY_RUN="1", PYTHON=str(tmp_path / "no-python"))
    assert failing.returncode == 1  # every step failed, each was recorded, and the script still finished
    steps = (tmp_path / "out" / "steps.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == ["env", "pytest", "grouped_gemm", "masked", "layer"]
    assert all(line.split("\t")[1] != "0" for line in steps)


NO_INSTALL = """
import importlib.util, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
assert importlib.util.find_spec("epruntime") is None, "epruntime must not be importable before the script runs"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["scripts/bench_grouped_gemm.py", "--device", "cpu", "--hidden", "64", "--intermediate", "32",
         "--experts", "2", "--rows", "16", "--warmup", "0", "--iters", "1"],
        ["scripts/gpu_figures.py", "env"],
    ],
)  # fmt: skip
def test_scripts_run_from_a_checkout_without_an_install(tmp_path: Path, argv: list[str]) -> None:
    script = [str(ROOT / argv[0]), *argv[1:]]
    result = subprocess.run(
        [sys.executable, "-c", NO_INSTALL, *script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
