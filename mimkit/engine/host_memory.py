"""How this process's C allocator treats freed host memory (glibc's malloc; elsewhere these do nothing).

By default glibc serves every block above a threshold (128 KiB, rising to at most 32 MiB as blocks are freed) with
its own ``mmap`` and unmaps it on free, and returns the top of the heap to the system once more than twice that
threshold is free there. A training step on the CPU allocates and frees the same few hundred tensor-sized blocks
every step, so each step asks the kernel for fresh zeroed pages again: on CPU-2, about 460 thousand page faults and
1.4 s of system time per SimMIM Swin-T step of about 5 s (docs/benchmarks.md, "Page faults").
``keep_freed_memory`` serves every block from the heap and never gives it back, so after the first steps each step
reuses the pages of the one before (the resident size stays at the run's peak instead of falling between steps; a
caching allocator, as PyTorch's own on a GPU). ``release_freed_memory`` goes the other way (every tensor-sized
block mapped and unmapped, so the resident size follows live memory): what ``mimkit bench`` uses while it measures
peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_INT_MAX = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536  # glibc's own default


def _glibc():
    """The C library if it is glibc (whose mallopt parameters these are), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Serve every block from the heap (no per-block mmap) and never trim it. True if applied (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))


def release_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Map every block above ``threshold`` bytes on its own and unmap it on free, trim the heap now and whenever
    more than ``threshold`` is free at its top. True if applied (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, _DEFAULT_MMAP_MAX) and libc.mallopt(M_MMAP_THRESHOLD, threshold)
    ok = ok and libc.mallopt(M_TRIM_THRESHOLD, threshold)
    libc.malloc_trim(0)
    return bool(ok)
