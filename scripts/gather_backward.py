"""Forward + backward time of a relative-position bias lookup: ``table[index]`` against ``F.embedding(index, table)``
(what ``mimkit.models.layers.bias_rows`` uses on CUDA) and its ``index_add`` lookup (the CPU default), for
docs/benchmarks.md: the lookup behind UM-MAE Swin's slow GPU step.

    python scripts/gather_backward.py [--device cuda] [--batch 64] [--windows 64] [--tokens 49] [--rows 441]

A per-image index (batch, windows, T, T) as UM-MAE's compact map has, and a shared (1, 1, T, T) one as on the regular
grid; random rows of a (rows, heads) table; 3 warm-up and 20 timed repetitions, synchronised; median ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mimkit  # noqa: F401  (before timm: the torchvision shim)
from mimkit.models.layers import bias_rows


def timed(fn, device, reps=20):
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=49)
    ap.add_argument("--rows", type=int, default=441)
    ap.add_argument("--heads", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    table = torch.randn(a.rows, a.heads, device=dev, requires_grad=True)
    shapes = (("per image", (a.batch, a.windows, a.tokens, a.tokens)), ("shared", (1, 1, a.tokens, a.tokens)))
    for name, shape in shapes:
        index = torch.randint(0, a.rows, shape, device=dev)
        # the gradient as attention hands it back: laid out (..., heads, T, T)
        grad = torch.randn(*shape[:-2], a.heads, *shape[-2:], device=dev).movedim(-3, -1)
        looks = {
            "table[index]": lambda i: table[i],
            "embedding": lambda i: F.embedding(i, table),
            "index_add": lambda i: bias_rows(table, i, "index_add"),
        }
        ms = {k: timed(lambda f=f, i=index, g=grad: torch.autograd.grad(f(i), table, g), dev) for k, f in looks.items()}
        print(f"{name} index {tuple(shape)}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + "; as fast as table[index]: " + ", ".join(f"{k} {ms['table[index]'] / ms[k]:.1f}x" for k in
                                                      ("embedding", "index_add")), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
