"""Tests that need CUDA GPUs: marked ``gpu`` and skipped, saying so, where none is visible.

Run them on a GPU machine with ``scripts/gpu_check.sh`` (they are part of ``pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch

NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is False); run scripts/gpu_check.sh on a GPU machine"

requires_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


def gpu_count_reason(count: int) -> str | None:
    """Why a test needing ``count`` GPUs cannot run here, or None."""
    if not torch.cuda.is_available():
        return NO_GPU
    if torch.cuda.device_count() < count:
        return f"needs {count} CUDA GPUs, {torch.cuda.device_count()} visible"
    return None
