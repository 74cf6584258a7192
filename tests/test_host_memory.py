"""mimkit/engine/host_memory.py: keeping freed host memory stops the page faults of a repeated allocation."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)

PROBE = """
import resource, sys
import torch
from mimkit.engine.host_memory import keep_freed_memory, release_freed_memory
assert (keep_freed_memory if sys.argv[1] == "keep" else release_freed_memory)()
def touch():
    torch.empty(10 * 2**20).fill_(1.0)  # 40 MB, allocated, written and freed
for _ in range(3):  # the heap settles: small objects may take the start of a freed block once or twice
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_kept_memory_is_reused_without_faults_and_released_memory_faults_again():
    pages = 6 * 40 * 2**20 // 4096  # every 4 KiB page of six fresh 40 MB blocks
    released, kept = faults("release"), faults("keep")
    assert released > 0.8 * pages, released  # each block mapped anew and faulted in page by page
    assert kept < 0.2 * pages, kept  # the same heap pages again (at most one block's worth anew)
