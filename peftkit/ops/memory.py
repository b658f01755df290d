"""Process-level allocator setting for training on Linux/glibc.

By default glibc gives large freed blocks back to the kernel (``munmap``/heap trimming) and a later step faults
them in again, page by page: on the machines measured here a training step of MiniLM then spends 0.1-0.5 s in
page faults, and how much depends on what else ran before. ``keep_freed_memory()`` asks glibc to keep freed
memory for reuse, as PyTorch's own CUDA caching allocator does on GPUs. It changes the whole process, so it is
opt-in: the CLI trainer and the benchmarks call it; a library user may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory mapped (no trimming, no mmap for big blocks). True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS, Windows)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1  # blocks up to 1 GiB come from the heap, not mmap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)
