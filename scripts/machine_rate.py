"""How fast this machine multiplies matrices right now: one fp32 product of fixed shape on the CPU, in GFLOP/s.

A shared or virtual machine can run everything 20-35 % slower for an hour (another tenant, a throttled host): the
side-by-side logs then show both codes' steps longer, and a ratio taken then is not a ratio of a steady machine
(docs/benchmarks.md, "mimkit against the released code"). ``scripts/side_by_side_compiled.py`` runs this probe in a
process of its own before every round and keeps its ``RESULT`` line in the log (row ``machine_rate``), and
``scripts/reference_ratios.py --history`` shows the median and range per run, so that a log says itself how the machine
ran (CPU-3 on steady days: 350-410 GFLOP/s).

    .venv/bin/python scripts/machine_rate.py            # RESULT {"row": "machine_rate", "gflops": ..., ...}
"""

from __future__ import annotations

import argparse
import statistics
import time

ROW = "machine_rate"
SHAPE = (2048, 512, 2048)  # (m, k, n) of the probe


def rate(m: int = 2048, k: int = 512, n: int = 2048, repeats: int = 20, warmup: int = 3) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` in float32 on the CPU with torch's current threads: the median of ``repeats``
    timed products after ``warmup`` untimed ones."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main(argv=None) -> None:
    import torch
    from _results import print_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    gflops = rate(*SHAPE, repeats=a.repeats)
    print_result({"row": ROW, "gflops": round(gflops, 1), "shape": list(SHAPE), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
