"""torch.profiler table of mimkit training steps (the operators that take the time), for docs/benchmarks.md.

    .venv/bin/python scripts/profile_step.py umae_swin_tiny_256 --img-size 256 --batch-size 8 [--rows 15]
    python scripts/profile_step.py umae_swin_tiny_256 --batch-size 64 --device cuda     # bf16 autocast on a GPU
    .venv/bin/python scripts/profile_step.py umae_pvt_small_256 --img-size 256 --dispatch [--shapes]  # no profiler

Three warm-up steps, then two profiled steps of zero_grad + forward + backward + the fused AdamW update, on random
images; operators sorted by their own CPU time, with the share of GEMMs (mm, bmm, addmm) printed at the end. On CUDA
(bf16 autocast) a second table sorts by GPU time, and the wall time per step is set against the GPU's busy time
(a step much longer than its kernels is bound by the host: launches, synchronisations, Python).

``--dispatch`` (CPU) times each operator of one step with a wall clock inside a ``TorchDispatchMode`` instead, with
freed host memory kept as the trainer keeps it: ``torch.profiler``'s own overhead roughly doubles short per-element
operators here (a stage-1 GELU of UM-MAE PVT-S: 1.5-1.8 ms so, 3.2 ms profiled; docs/benchmarks.md, "Row gathers").
Operators by total time, with ``--shapes`` by operator and input shapes.
"""

from __future__ import annotations

import argparse

import torch
from _train_step import build, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    ap.add_argument("--dispatch", action="store_true", help="time operators in a dispatch mode (CPU), no profiler")
    ap.add_argument("--shapes", action="store_true", help="with --dispatch: group by input shapes too")
    a = ap.parse_args()
    if a.dispatch:
        dispatch_times(a)
        return
    net, opt, (batch,) = build(a.model, a.batch_size, a.img_size, a.device)
    cuda = batch["image"].is_cuda

    def step():
        train_step(net, opt, batch)

    import time

    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        print(f"wall time per step (5 steps, synchronised at the ends): {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=48))
        from torch.autograd import DeviceType

        busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)  # the kernels alone
        print(f"GPU busy (sum of kernel times): {busy / 2e3:.1f} ms per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=48))
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    print(f"GEMMs (mm, bmm, addmm): {100 * gemm / total:.1f} % of self CPU time; {total / 2e6:.2f} s per step")


def dispatch_times(a) -> None:
    """One step after three, every operator timed by a wall clock around its call; summed by name (and shapes)."""
    import collections
    import time

    from torch.utils._python_dispatch import TorchDispatchMode

    from mimkit.engine.host_memory import as_the_command_runs

    as_the_command_runs()  # host memory as the `mimkit` command runs (mimkit/engine/host_memory.py)
    net, opt, (batch,) = build(a.model, a.batch_size, a.img_size, "cpu")
    totals: dict = collections.defaultdict(lambda: [0.0, 0])

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            key = str(func)
            if a.shapes:
                key += " " + str([tuple(x.shape) for x in args if isinstance(x, torch.Tensor)][:3])
            totals[key][0] += time.perf_counter() - t0
            totals[key][1] += 1
            return out

    for _ in range(3):
        train_step(net, opt, batch)
    t0 = time.perf_counter()
    with Timer():
        train_step(net, opt, batch)
    wall = time.perf_counter() - t0
    ops = sum(v[0] for v in totals.values())
    print(f"one step: {wall * 1e3:.0f} ms with the timer, {ops * 1e3:.0f} ms inside operators")
    print(f"{'ms':>9s} {'calls':>6s}  operator")
    for key, (s, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: a.rows]:
        print(f"{s * 1e3:9.2f} {calls:6d}  {key}")


if __name__ == "__main__":
    main()
