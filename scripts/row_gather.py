"""Forward + backward time of moving whole token rows, element-wise against row-wise, for docs/benchmarks.md ("Row
gathers"): ``torch.gather`` with an index expanded over the channels against ``mimkit.masking.gather_tokens``
(``index_select`` of rows), ``scatter`` into expanded rows against ``mimkit.models.decoder.spread``
(``index_copy_`` into a ``repeat``), and the norm_pix target as mean and ``var`` against
``mimkit.patches.normalized_target`` (a layer norm).

    python scripts/row_gather.py [--device cuda] [--batch 8] > docs/benchmarks/row_gather_cpu.txt
    python scripts/row_gather.py --render docs/benchmarks/row_gather_cpu.txt    # the kept result, for the docs

The shapes of a UM-MAE / MAE decoder at 256 px with 16 px patches (256 positions, 64 visible, 512 channels; its first
block's qkv rows, 1536 channels; 768 target values per patch); 3 warm-up and 20 timed repetitions, synchronised;
median ms.
"""

from __future__ import annotations

import argparse

import torch
from gather_backward import timed

import mimkit  # noqa: F401  (before timm: the torchvision shim)
from mimkit.masking import gather_tokens
from mimkit.models.decoder import spread
from mimkit.patches import normalized_target


def forward_backward(fn, leaves):
    def run():
        out = fn()
        if leaves:
            torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--render", metavar="FILE", help="print a kept result as a Markdown code block and stop")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            print("```\n" + f.read().rstrip("\n") + "\n```")
        return
    dev = torch.device(a.device)
    torch.manual_seed(0)
    n, length, visible = a.batch, 256, 64
    cases = []
    for d, k in ((512, length - visible), (1536, visible)):
        x = torch.randn(n, length, d, device=dev, requires_grad=True)
        ids = torch.stack([torch.randperm(length, device=dev)[:k] for _ in range(n)])
        index = ids.unsqueeze(-1).expand(-1, -1, d)
        cases.append(
            (
                f"gather ({n}, {length}, {d}) at {k}",
                forward_backward(lambda x=x, index=index: torch.gather(x, 1, index), [x]),
                forward_backward(lambda x=x, ids=ids: gather_tokens(x, ids), [x]),
            )
        )
    for d in (512, 1536):
        own = torch.randn(n, visible, d, device=dev, requires_grad=True)
        common = torch.randn(length, d, device=dev, requires_grad=True)
        where = torch.stack([torch.randperm(length, device=dev)[:visible] for _ in range(n)])
        index = where.unsqueeze(-1).expand(-1, -1, d)
        cases.append(
            (
                f"scatter {visible} of ({n}, {length}, {d})",
                forward_backward(lambda o=own, c=common, i=index: c.expand(n, -1, -1).scatter(1, i, o), [own, common]),
                forward_backward(lambda o=own, c=common, w=where: spread(o, c, w), [own, common]),
            )
        )
    t = torch.randn(n, length - visible, 768, device=dev)

    def by_var():
        return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5

    cases.append((f"norm_pix target ({n}, {length - visible}, 768)", by_var, lambda: normalized_target(t)))
    assert torch.allclose(by_var(), normalized_target(t), atol=1e-5)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}; forward + backward, ms")
    print(f"{'operation':40s} {'element-wise':>12s} {'row-wise':>9s} {'speed-up':>8s}")
    for name, old, new in cases:
        t_old, t_new = timed(old, dev), timed(new, dev)
        print(f"{name:40s} {t_old:12.3f} {t_new:9.3f} {t_old / t_new:7.2f}x")


if __name__ == "__main__":
    main()
