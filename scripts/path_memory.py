"""Per-worker memory of 1 M image paths: a Python list of str vs mimkit's PathArray, in forked data-loader workers
that read every path once. Prints the growth of each worker's private memory (USS, /proc/self/smaps_rollup) between
its first and its last item, in MB, for docs/data.md, in alternating rounds.

    .venv/bin/python scripts/path_memory.py --paths 1000000 --workers 2 --rounds 3 \
        --out docs/benchmarks/path_memory.json
    .venv/bin/python scripts/path_memory.py --render docs/benchmarks/path_memory.json
"""

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mimkit.data.patharray import PathArray

sys.path.insert(0, str(Path(__file__).parent))
from bench_table import add_result_args, write_result  # noqa: E402


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


KINDS = ("no paths (baseline)", "list of str", "PathArray")
LABELS = {
    "no paths (baseline)": "nothing (the loader's own growth over the items)",
    "list of str": "Python list of str",
    "PathArray": "`PathArray`",
}


def make_names(n: int) -> list[str]:
    """``n`` ImageNet-like file paths."""
    return [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(n)]


def one_round(n_paths: int, workers: int, order) -> dict[str, float]:
    """Each kind in ``order``: the largest growth of a worker's private memory over the pass, MB."""
    results = {}
    for kind in order:
        gc.collect()
        if kind == "list of str":
            paths = make_names(n_paths)
        elif kind == "PathArray":
            paths = PathArray(make_names(n_paths))  # the list is gone before the workers fork
        else:
            paths = ["x"] * n_paths  # one shared string: the loader's own growth
        gc.collect()
        loader = DataLoader(Paths(paths), batch_size=4096, num_workers=workers, shuffle=False)
        growth = 0.0
        for batch in loader:
            growth = max(growth, float(batch[:, 1].max()))
        results[kind] = round(growth, 1)
        del paths, loader
    return results


def render(path: Path) -> str:
    """The Markdown table of a result file: per kind, median and range over the rounds, and the part of the paths."""
    res = json.loads(path.read_text())
    rounds = res["rounds"]
    base = statistics.median(r[KINDS[0]] for r in rounds)
    lines = [
        f"{res['date']}, {res['machine']}; {res['paths']:,} paths of {res['mean_path_chars']:.0f} characters, "
        f"{res['workers']} workers, {len(rounds)} alternating rounds (MB):",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "| paths held as | worker growth, median (range) | of which the paths |",
        "|---|---|---|",
    ]
    for kind in KINDS:
        vals = [r[kind] for r in rounds]
        med = statistics.median(vals)
        extra = "" if kind == KINDS[0] else f"{med - base:+.1f} MB per worker"
        lines.append(f"| {LABELS[kind]} | {med:.1f} ({min(vals):.1f}-{max(vals):.1f}) | {extra} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    rounds = [one_round(args.paths, args.workers, KINDS if r % 2 == 0 else KINDS[::-1]) for r in range(args.rounds)]
    names = make_names(1000)
    command = (f".venv/bin/python scripts/path_memory.py --paths {args.paths} --workers {args.workers} "
               f"--rounds {args.rounds} --out {args.out}")  # fmt: skip
    result = {"paths": args.paths, "workers": args.workers, "mean_path_chars": sum(map(len, names)) / 1000,
              "command": command, "rounds": rounds}  # fmt: skip
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
