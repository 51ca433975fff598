"""Fail when the NVSHMEM host library torch loads is not the version DeepEP was built against.

DeepEP links NVSHMEM's device library statically (``libnvshmem_device.a`` of the ``nvidia-nvshmem`` wheel it
was built with) and its host library by soname (``libnvshmem_host.so.3``, found through an rpath into that
wheel). torch's own ``libtorch_nvshmem.so`` needs the same soname: when torch loads it first from somewhere
else (the base image's NVSHMEM), the process keeps that copy, and ``deep_ep.Buffer`` fails at run time with
"NVSHMEM device library version does not match". This script does what a process does (imports torch and
loads torch's NVSHMEM library), reads which host library got mapped, and compares its version with the
wheel's. It needs no GPU, so the image build runs it (docker/Dockerfile):

    python scripts/check_nvshmem.py --expect 3.5.21
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HOST_LIB = "libnvshmem_host.so"
# Reads the library's own version in a child process (a library that cannot be loaded cannot crash the check).
PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
v = [ctypes.c_int() for _ in range(3)]
lib.nvshmemx_vendor_get_version_info(*(ctypes.byref(x) for x in v))
print(".".join(str(x.value) for x in v))
"""


def mapped_libraries(maps: str, name: str) -> list[str]:
    """The files named ``name*`` in a ``/proc/<pid>/maps`` text, each once, in order of first mapping."""
    found: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path (absent for anonymous maps)
        if len(fields) == 6 and Path(fields[5]).name.startswith(name) and fields[5] not in found:
            found.append(fields[5])
    return found


def wheel_versions(name: str) -> dict[str, str]:
    """``realpath -> version`` of every installed distribution's file named ``name*`` (the NVSHMEM wheels)."""
    versions = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if file.name.startswith(name):
                versions[os.path.realpath(dist.locate_file(file))] = dist.version
    return versions


def wheel_host_library() -> str | None:
    """The host library of the ``nvidia-nvshmem`` wheel (where DeepEP's setup.py finds NVSHMEM), or None."""
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except ModuleNotFoundError:  # no nvidia namespace at all
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted((Path(spec.submodule_search_locations[0]) / "lib").glob(f"{HOST_LIB}.*"))
    return os.path.realpath(libs[0]) if libs else None


def library_version(path: str) -> str | None:
    """The version NVSHMEM reports for the library at ``path`` (``nvshmemx_vendor_get_version_info``), or None."""
    probe = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, check=False)
    version = probe.stdout.strip()
    return version if probe.returncode == 0 and version else None


def problems(torch_libs: list[str], deepep_lib: str | None, versions: dict[str, str | None], expect: str) -> list[str]:
    """What is wrong, one line each: ``torch_libs`` (host libraries mapped after loading torch's NVSHMEM),
    ``deepep_lib`` (the wheel's host library DeepEP links), their ``versions`` and the ``expect``-ed one."""
    found = []
    if deepep_lib is None:
        found.append(f"no {HOST_LIB}.* in the nvidia-nvshmem wheel DeepEP builds against; install it")
    elif versions.get(deepep_lib) not in (None, expect):
        found.append(f"DeepEP's NVSHMEM {deepep_lib} is {versions[deepep_lib]}, the build expects {expect}")
    for lib in torch_libs:
        if deepep_lib is not None and os.path.realpath(lib) == os.path.realpath(deepep_lib):
            continue
        version = versions.get(lib)
        if version != expect:
            found.append(
                f"torch loads NVSHMEM {version or 'of unknown version'} from {lib}, DeepEP was built against "
                f"{expect} ({deepep_lib}): the process would keep torch's copy and deep_ep.Buffer would fail with "
                f"'NVSHMEM device library version does not match'; build with --build-arg NVSHMEM_VERSION="
                f"{version or '<the version torch loads>'} or make torch load {deepep_lib}"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect", required=True, help="the NVSHMEM version DeepEP is built against (NVSHMEM_VERSION)")
    args = parser.parse_args(argv)
    import torch

    torch_nvshmem = Path(torch.__file__).parent / "lib" / "libtorch_nvshmem.so"
    if torch_nvshmem.exists():  # what any torch code path may load before deep_ep is imported
        ctypes.CDLL(str(torch_nvshmem), mode=ctypes.RTLD_GLOBAL)
    torch_libs = [os.path.realpath(p) for p in mapped_libraries(Path("/proc/self/maps").read_text(), HOST_LIB)]
    wheel_lib = wheel_host_library()
    versions: dict[str, str | None] = dict(wheel_versions(HOST_LIB))
    for lib in [*torch_libs, wheel_lib]:
        if lib is not None and lib not in versions:
            versions[lib] = library_version(lib)
    print(f"check_nvshmem: torch {torch.__version__} maps {torch_libs or 'no NVSHMEM host library'}")
    print(f"check_nvshmem: DeepEP links {wheel_lib} ({versions.get(wheel_lib) if wheel_lib else '-'})")
    found = problems(torch_libs, wheel_lib, versions, args.expect)
    for line in found:
        print(f"check_nvshmem: {line}", file=sys.stderr)
    if not found:
        print(f"check_nvshmem: ok, one NVSHMEM {args.expect}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
