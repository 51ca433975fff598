"""Keep large CPU buffers in the heap so that layer after layer reuses the same pages.

glibc serves allocations above 32 MiB with fresh ``mmap`` pages that the kernel must fault in and
zero on every use, and returns them on free; an MoE layer allocates several such buffers per call
(the permuted rows, the GEMM outputs). Turning ``mmap`` off for malloc and raising the trim
threshold makes freed buffers come back without page faults: the CPU analogue of PyTorch's CUDA
caching allocator. Resident memory then stays at its peak instead of shrinking between layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}
KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}


def _mallopt(settings: dict[int, int]) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(libc.mallopt(option, value) for option, value in settings.items())
    except (OSError, AttributeError):
        return False


def keep_buffers_in_heap() -> bool:
    """Apply the glibc settings above to this process; False where there is no glibc ``mallopt``."""
    return _mallopt(KEPT)


@contextmanager
def glibc_default_malloc() -> Iterator[None]:
    """Run a block under glibc's default settings (how a peer library runs in its own process), then
    restore the heap-kept ones."""
    _mallopt(GLIBC_DEFAULTS)
    try:
        yield
    finally:
        keep_buffers_in_heap()
