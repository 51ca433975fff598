"""scripts/check_nvshmem.py, the image build's NVSHMEM check, on fake inputs (no GPU, no NVSHMEM here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_nvshmem", ROOT / "scripts" / "check_nvshmem.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

WHEEL = "/usr/local/lib/python3.12/dist-packages/nvidia/nvshmem/lib/libnvshmem_host.so.3"
IMAGE = "/opt/nvidia/nvshmem/lib/libnvshmem_host.so.3.2.5"
MAPS = f"""\
7f00aa000000-7f00aa100000 r-xp 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ab000000-7f00ab200000 r-xp 00000000 08:01 5678 {IMAGE}
7f00ab200000-7f00ab300000 r--p 00200000 08:01 5678 {IMAGE}
7f00ac000000-7f00ac001000 rw-p 00000000 00:00 0
"""


def test_mapped_libraries_reads_proc_maps() -> None:
    assert check.mapped_libraries(MAPS, "libnvshmem_host.so") == [IMAGE]  # once, anonymous maps skipped
    assert check.mapped_libraries(MAPS, "libtorch_nvshmem") == []


def test_the_same_library_or_version_passes() -> None:
    assert check.problems([], WHEEL, {WHEEL: "3.5.21"}, "3.5.21") == []  # torch loads none: DeepEP's own loads
    assert check.problems([WHEEL], WHEEL, {WHEEL: "3.5.21"}, "3.5.21") == []  # torch loads DeepEP's
    assert check.problems([IMAGE], WHEEL, {WHEEL: "3.5.21", IMAGE: "3.5.21"}, "3.5.21") == []  # same version


def test_another_version_fails_naming_both_and_the_fix() -> None:
    found = check.problems([IMAGE], WHEEL, {WHEEL: "3.5.21", IMAGE: "3.2.5"}, "3.5.21")
    assert len(found) == 1
    line = found[0]
    assert "3.2.5" in line and IMAGE in line and WHEEL in line and "device library version does not match" in line
    assert "--build-arg NVSHMEM_VERSION=3.2.5" in line
    unknown = check.problems([IMAGE], WHEEL, {WHEEL: "3.5.21", IMAGE: None}, "3.5.21")
    assert "of unknown version" in unknown[0]


def test_a_wrong_or_missing_wheel_fails() -> None:
    assert "the build expects 3.5.21" in check.problems([], WHEEL, {WHEEL: "3.4.5"}, "3.5.21")[0]
    assert "no libnvshmem_host.so.*" in check.problems([], None, {}, "3.5.21")[0]


def test_main_passes_with_the_wheel_and_no_torch_nvshmem(tmp_path: Path, monkeypatch, capsys) -> None:
    """On this CPU torch (no libtorch_nvshmem.so) with a stand-in nvidia.nvshmem wheel of the expected version."""
    lib = tmp_path / "nvidia" / "nvshmem" / "lib" / "libnvshmem_host.so.3"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    monkeypatch.setattr(check, "wheel_host_library", lambda: os.path.realpath(lib))
    monkeypatch.setattr(check, "wheel_versions", lambda name: {os.path.realpath(lib): "3.5.21"})
    assert check.main(["--expect", "3.5.21"]) == 0
    assert "ok, one NVSHMEM 3.5.21" in capsys.readouterr().out
    assert check.main(["--expect", "3.6.0"]) == 1
    assert "the build expects 3.6.0" in capsys.readouterr().err


def test_library_version_of_a_file_that_is_no_library_is_unknown(tmp_path: Path) -> None:
    bogus = tmp_path / "libnvshmem_host.so.3"
    bogus.write_bytes(b"not an ELF file")
    assert check.library_version(str(bogus)) is None


@pytest.mark.parametrize("argv", [[], ["--expect"]])
def test_expect_is_required(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        check.main(argv)
