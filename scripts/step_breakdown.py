"""Where a training step's time goes: wall seconds per step, split into forward, backward and update, and the
decoder's share of the forward and the backward (module hooks; CPU operations are synchronous, so the hooks' clocks
are exact there), for docs/benchmarks.md. Host memory is kept for reuse, in 2 MiB pages where the system allows, as
the ``mimkit`` command runs by default.

    .venv/bin/python scripts/step_breakdown.py umae_pvt_small_256 [--steps 4] [--batch-size 8]
    .venv/bin/python scripts/step_breakdown.py umae_swin_tiny_256 --steps 5 --total-only   # one line: s per step
    .venv/bin/python scripts/step_breakdown.py umae_swin_tiny_256 --total-only --cpu-bf16  # as --cpu-autocast runs

Two warm-up steps, then ``--steps`` timed ones on random images (zero_grad + forward + backward + fused AdamW).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from _train_step import build, train_step

from mimkit.engine.host_memory import as_the_command_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--total-only", action="store_true", help="print only the median seconds per step")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU (the trainer's --cpu-autocast)")
    a = ap.parse_args()
    as_the_command_runs()  # host memory as the `mimkit` command runs (mimkit/engine/host_memory.py)
    net, opt, (batch,) = build(a.model, a.batch_size)
    acc: dict[str, float] = collections.defaultdict(float)
    start: dict[str, float] = {}
    decoder = getattr(net, "decoder", None)
    if isinstance(decoder, torch.nn.Module) and not a.total_only:
        decoder.register_forward_pre_hook(lambda m, i: start.__setitem__("f", time.perf_counter()))
        decoder.register_forward_hook(lambda m, i, o: acc.__setitem__("f", acc["f"] + time.perf_counter() - start["f"]))
        decoder.register_full_backward_pre_hook(lambda m, g: start.__setitem__("b", time.perf_counter()))
        decoder.register_full_backward_hook(
            lambda m, gi, go: acc.__setitem__("b", acc["b"] + time.perf_counter() - start["b"])
        )
    for _ in range(2):
        train_step(net, opt, batch, a.cpu_bf16)
    acc.clear()
    walls, fwd, bwd, upd = [], [], [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.cpu_bf16):
            loss = net(batch)[0]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        walls.append(t3 - t0)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        upd.append(t3 - t2)
    if a.total_only:
        tag = ", bf16 autocast" if a.cpu_bf16 else ""
        print(f"{a.model}{tag}: {statistics.median(walls):.3f} s per step (median of {a.steps})")
        return
    ms = 1e3
    print(f"{a.model}, batch {a.batch_size}, {torch.get_num_threads()} threads, mean of {a.steps} steps (ms):")
    print(f"  step {statistics.fmean(walls) * ms:.0f}: forward {statistics.fmean(fwd) * ms:.0f}, "
          f"backward {statistics.fmean(bwd) * ms:.0f}, update {statistics.fmean(upd) * ms:.0f}")  # fmt: skip
    if "f" in acc:
        df, db = acc["f"] / a.steps * ms, acc["b"] / a.steps * ms
        share = (df + db) / (statistics.fmean(walls) * ms)
        print(f"  decoder: forward {df:.0f}, backward {db:.0f} ({100 * share:.0f} % of the step)")


if __name__ == "__main__":
    main()
