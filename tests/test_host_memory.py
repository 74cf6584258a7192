"""mimkit/engine/host_memory.py: keeping freed host memory stops the page faults of a repeated allocation."""

import os
import platform
import subprocess
import sys

import pytest

from mimkit.engine import host_memory

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


HUGE_PROBE = """
import sys
import torch
from mimkit.engine.host_memory import as_the_command_runs, huge_page_mb, keep_freed_memory, restart_with_huge_page_heap
if sys.argv[1] == "restart":
    restart_with_huge_page_heap()  # runs this program again with the tunable; returns if nothing would change
if sys.argv[1] == "as-the-command":
    assert as_the_command_runs()  # the scripts' one call: the restart, then freed memory kept
else:
    assert keep_freed_memory()
x = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB from the heap, touched
print(huge_page_mb())  # MB of this process's memory in 2 MiB pages
"""

huge_pages_here = pytest.mark.skipif(
    host_memory.huge_page_heap_env({}) is None, reason="needs glibc >= 2.35 and transparent huge pages in madvise mode"
)


def _huge_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.split()[-1])


@huge_pages_here
def test_restart_with_the_tunable_puts_the_heap_in_huge_pages():
    assert _huge_mb("plain") == 0  # madvise mode: unmarked memory stays in 4 KiB pages
    assert _huge_mb("restart") >= 32  # most of the 64 MB block in 2 MiB pages after the restart
    assert _huge_mb("as-the-command") >= 32


def test_tunable_added_only_where_it_changes_something(monkeypatch):
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "madvise")
    assert host_memory.huge_page_heap_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # the user's other tunables are kept
    assert host_memory.huge_page_heap_env(other)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert host_memory.huge_page_heap_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    for mode in ("always", "never", None):  # the heap has huge pages already / cannot have them / unknown
        monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda mode=mode: mode)
        assert host_memory.huge_page_heap_env({}) is None
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "madvise")
    for version in ((2, 34), None):  # no such tunable before glibc 2.35; not glibc
        monkeypatch.setattr(host_memory, "glibc_version", lambda version=version: version)
        assert host_memory.huge_page_heap_env({}) is None


def test_kernel_mode_read_from_its_file(tmp_path):
    mode_file = tmp_path / "enabled"
    for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"), ("", None)):
        mode_file.write_text(text)
        assert host_memory.transparent_huge_pages(str(mode_file)) == mode
    assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) is None


@huge_pages_here
@pytest.mark.parametrize("setting, pages", [("auto", "2 MiB"), ("off", "4 KiB")])
def test_pretrain_command_restarts_itself_with_the_heap_in_huge_pages(tiny_folder, tmp_path, setting, pages):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mimkit.cli", "pretrain", "--data", str(tiny_folder), "--model"]
    cmd += ["mae_vit_pico_patch8", "--epochs", "1", "--batch-size", "4", "--precision", "fp32", "--num-workers", "0"]
    cmd += ["--output", str(run), "--no-progress", "--host-huge-pages", setting]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count('"steps"') == 1  # one run, one summary: the restart replaced the first start
    assert f"heap pages of {pages}" in (run / "train.log").read_text()
