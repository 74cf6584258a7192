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

The heap's pages are 4 KiB unless the kernel is asked for more: with transparent huge pages in their common
"madvise" mode, only memory marked so gets 2 MiB pages, and glibc marks its heap when the tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35 or later) is in ``GLIBC_TUNABLES`` when a program starts. A CPU step then
misses the processor's address cache far less while it streams through activations, gradients and optimizer state
(UM-MAE PVT-S's step about 1.05x as fast on CPU-3; docs/benchmarks.md, "Huge pages"). glibc reads its tunables only
at start-up, so :func:`restart_with_huge_page_heap` starts the program again in the same process with the tunable
added; the ``mimkit`` command does this for its training commands (``--host-huge-pages``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_INT_MAX = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536  # glibc's own default
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc marks its heap and mmapped chunks MADV_HUGEPAGE
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of this process's glibc, None elsewhere."""
    name, version = platform.libc_ver()
    found = re.match(r"(\d+)\.(\d+)", version) if name == "glibc" and platform.system() == "Linux" else None
    return (int(found[1]), int(found[2])) if found else None


def transparent_huge_pages(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode: "always", "madvise" or "never"; None where it cannot be read."""
    try:
        found = re.search(r"\[(\w+)\]", Path(path).read_text())
    except OSError:
        return None
    return found[1] if found else None


def _glibc_has_tunable() -> bool:
    """glibc 2.35 or later, the first with ``glibc.malloc.hugetlb``."""
    version = glibc_version()
    return version is not None and version >= (2, 35)


def huge_page_heap_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with :data:`HUGE_PAGE_TUNABLE` added to ``GLIBC_TUNABLES``, or None where that would change
    nothing: not glibc 2.35 or later, the kernel's mode is not "madvise" ("always" gives the heap huge pages
    already, "never" cannot), or ``GLIBC_TUNABLES`` sets ``glibc.malloc.hugetlb`` already (to any value: a user's
    own choice stands)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    if not _glibc_has_tunable() or transparent_huge_pages() != "madvise":
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGE_TUNABLE}" if tunables else HUGE_PAGE_TUNABLE}


def huge_page_heap() -> bool:
    """Whether this process's heap gets 2 MiB pages: the kernel gives them to all memory ("always"), or to marked
    memory ("madvise") and glibc, 2.35 or later, was started with the tunable."""
    mode = transparent_huge_pages()
    tunable = HUGE_PAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "") and _glibc_has_tunable()
    return mode == "always" or (mode == "madvise" and tunable)


def huge_page_mb() -> float | None:
    """MB of this process's memory in 2 MiB pages now (``AnonHugePages`` of /proc/self/smaps_rollup); None where
    the file cannot be read."""
    try:
        fields = Path("/proc/self/smaps_rollup").read_text().split()
        return int(fields[fields.index("AnonHugePages:") + 1]) / 1024
    except (OSError, ValueError, IndexError):
        return None


def restart_with_huge_page_heap() -> None:
    """Run this program again from its start in this process (``exec``: the same process id, arguments, open files
    and environment plus the tunable) where :func:`huge_page_heap_env` adds the tunable; return where it does not,
    or where the restart fails. glibc reads tunables only when a program starts, hence the restart: call it before
    the program has done anything it must not do twice. The restarted program finds the tunable set and goes on."""
    env = huge_page_heap_env(os.environ)
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own command line, options and script included
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def as_the_command_runs() -> bool:
    """The host memory of a ``mimkit pretrain`` process with its defaults (``--host-memory keep --host-huge-pages
    auto``), for scripts that time its steps: this program started again with the heap in 2 MiB pages where that
    changes something (:func:`restart_with_huge_page_heap`, so call it first), then freed memory kept for reuse;
    returns whether it is kept (:func:`keep_freed_memory`)."""
    restart_with_huge_page_heap()
    return keep_freed_memory()
