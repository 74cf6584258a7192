"""torch.profiler table of mimkit training steps (the operators that take the time), for docs/benchmarks.md.

    .venv/bin/python scripts/profile_step.py umae_swin_tiny_256 --img-size 256 --batch-size 8 [--rows 15]

Two warm-up steps, then two profiled steps of zero_grad + forward + backward + the fused AdamW update, on random
images; operators sorted by their own CPU time, with the share of GEMMs (mm, bmm, addmm) printed at the end.
"""

from __future__ import annotations

import argparse

import torch

import mimkit  # noqa: F401  (before timm: the torchvision shim)
from mimkit.engine.optim import build_optimizer
from mimkit.methods import create_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=15)
    a = ap.parse_args()
    torch.manual_seed(0)
    net = create_method(a.model, **({"img_size": a.img_size} if a.img_size else {})).train()
    opt = build_optimizer(net.param_groups(0.05), 1e-4, net.betas, torch.device("cpu"))
    side = net.img_size if isinstance(net.img_size, int) else net.img_size[0]
    batch = {"image": torch.randn(a.batch_size, net.in_chans, side, side)}

    def step():
        opt.zero_grad(set_to_none=True)
        net(batch)[0].backward()
        opt.step()

    for _ in range(2):
        step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=48))
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    print(f"GEMMs (mm, bmm, addmm): {100 * gemm / total:.1f} % of self CPU time; {total / 2e6:.2f} s per step")


if __name__ == "__main__":
    main()
