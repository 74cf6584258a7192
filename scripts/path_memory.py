"""Per-worker memory of 1 M image paths: a Python list of str vs mimkit's PathArray, in forked data-loader workers
that read every path once. Prints the growth of each worker's private memory (USS, /proc/self/smaps_rollup) between
its first and its last item, in MB, for docs/data.md.

    .venv/bin/python scripts/path_memory.py --paths 1000000 --workers 2
"""

import argparse
import gc
import json

import torch
from torch.utils.data import DataLoader, Dataset

from mimkit.data.patharray import PathArray


def private_mb() -> float:
    total = 0
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


class Paths(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.first: float | None = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.first is None:
            self.first = private_mb()
        n = len(self.paths[i])  # what a real dataset does: read the path
        self.last = private_mb() - self.first if i % 10_000 == 0 or i == len(self) - 1 else getattr(self, "last", 0.0)
        return torch.tensor([n, self.last])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    def make_names():
        return [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(args.paths)]

    results = {}
    for kind in ("no paths (baseline)", "list of str", "PathArray"):
        gc.collect()
        if kind == "list of str":
            paths = make_names()
        elif kind == "PathArray":
            paths = PathArray(make_names())  # the list is gone before the workers fork
        else:
            paths = ["x"] * args.paths  # one shared string: the loader's own growth
        gc.collect()
        loader = DataLoader(Paths(paths), batch_size=4096, num_workers=args.workers, shuffle=False)
        growth = 0.0
        for batch in loader:
            growth = max(growth, float(batch[:, 1].max()))
        results[kind] = round(growth, 1)
        del paths, loader
    names = make_names()[:1000]
    print(
        json.dumps(
            {
                "paths": args.paths,
                "workers": args.workers,
                "mean_path_chars": sum(map(len, names[:1000])) / 1000,
                "max_worker_growth_mb": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
