"""``pytest -m gpu tests`` where safetensors, transformers and tqdm are missing (the GPU image installs
epruntime with --no-deps): collection survives, every GPU test is still collected, and each one skips here
with its reason; the modules that need a missing package skip saying which one and how to get it.

The packages are made unimportable in a subprocess by a ``-p`` plugin that sits first on ``sys.meta_path``.
``CUDA_VISIBLE_DEVICES=""`` keeps the run on the CPU path wherever this test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("safetensors", "transformers", "tqdm")
BLOCKER = f"""
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
"""


def _pytest(tmp_path: Path, *args: str, block: bool) -> subprocess.CompletedProcess:
    (tmp_path / "block_optional.py").write_text(BLOCKER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(tmp_path)}
    plugin = ["-p", "block_optional"] if block else []
    cmd = [sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", "-m", "gpu", "tests", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _collected(result: subprocess.CompletedProcess) -> list[str]:
    return sorted(line for line in result.stdout.splitlines() if "::" in line)


@pytest.fixture(scope="module")
def blocked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, ET.Element]:
    tmp = tmp_path_factory.mktemp("blocked")
    result = _pytest(tmp, "-q", "-rs", "--junitxml", str(tmp / "gpu.xml"), block=True)
    return result, ET.parse(tmp / "gpu.xml").getroot()


def test_blocker_really_blocks(tmp_path: Path) -> None:
    (tmp_path / "block_optional.py").write_text(BLOCKER)
    probe = "import block_optional\ntry:\n    import safetensors\nexcept ModuleNotFoundError:\n    print('blocked')"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "blocked"


def test_every_gpu_test_is_collected_without_the_optional_packages(tmp_path: Path) -> None:
    full = _pytest(tmp_path, "--collect-only", "-q", block=False)
    blocked = _pytest(tmp_path, "--collect-only", "-q", block=True)
    assert blocked.returncode == 0, blocked.stdout[-3000:] + blocked.stderr[-3000:]
    assert "error" not in blocked.stdout.lower().split("collected")[-1]
    assert _collected(blocked) == _collected(full) and any(t.startswith("tests/gpu/") for t in _collected(full))


def test_gpu_tests_skip_with_their_reasons(blocked_run: tuple[subprocess.CompletedProcess, ET.Element]) -> None:
    result, junit = blocked_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = list(junit.iter("testcase"))
    assert cases and all(case.find("skipped") is not None for case in cases)  # nothing ran, nothing failed
    reasons = [case.find("skipped").get("message", "") for case in cases]
    assert all(reason.strip() for reason in reasons)
    assert any("no CUDA GPU visible" in r for r in reasons)
    summary = result.stdout
    for module in ("test_checkpoint.py", "test_fp8.py", "test_model.py"):  # they import safetensors at the top
        assert f"{module} needs safetensors, which is not installed; pip install safetensors" in summary
