"""Time the README's first command on a fresh clone: `make demo` (venv creation and install, then the demo job), and
keep its kNN lines, as a result file for docs/benchmarks.md.

    .venv/bin/python scripts/time_demo.py --rounds 3 --out docs/benchmarks/demo_time.json   # about 5 min a round
    .venv/bin/python scripts/time_demo.py --render docs/benchmarks/demo_time.json

Each round clones the committed HEAD of this repository into a temporary folder and runs `make install` and then
`make demo` there (the demo target's own work once installed), timing each; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_table import add_result_args, write_result  # noqa: E402


def one_round() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "mimkit"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        times = {}
        out = ""
        for target in ("install", "demo"):
            t0 = time.perf_counter()
            done = subprocess.run(["make", target], cwd=repo, capture_output=True, text=True)
            times[target] = time.perf_counter() - t0
            if done.returncode:
                raise SystemExit(f"make {target} failed:\n{done.stderr[-2000:]}")
            out = done.stdout
        found = re.search(r"kNN top-1: pretrained ([\d.]+)% vs random init ([\d.]+)%", out)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    return {
        "install_s": times["install"],
        "demo_s": times["demo"],
        "knn_pretrained": float(found.group(1)) if found else None,
        "knn_random": float(found.group(2)) if found else None,
        "commit": commit.stdout.strip(),
    }


def render(path: Path) -> str:
    res = json.loads(path.read_text())
    runs = res["rounds"]

    def cell(key: str, unit: str = "s") -> str:
        vals = [r[key] for r in runs if r[key] is not None]
        return f"{statistics.median(vals):.0f} {unit} ({min(vals):.0f}-{max(vals):.0f})"

    total = [r["install_s"] + r["demo_s"] for r in runs]
    knn = sorted({(r["knn_pretrained"], r["knn_random"]) for r in runs})
    lines = [
        f"{res['date']}, {res['machine']}, commit {runs[0]['commit']}, {len(runs)} rounds, each on a fresh clone "
        "(median and range):",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "| phase | wall time |",
        "|---|---|",
        f"| `make install`: `.venv` creation and install | {cell('install_s')} |",
        f"| `make demo` once installed: pretraining, two kNN evaluations, the figure | {cell('demo_s')} |",
        f"| **`make demo` on a fresh clone, total** | **{statistics.median(total):.0f} s** "
        f"({min(total):.0f}-{max(total):.0f}) |",
        "",
        "Demo kNN top-1 (10 classes, 300 train / 100 val bundled images, 64 px), pretrained vs random init: "
        + "; ".join(f"{p:.1f} % vs {r:.1f} %" for p, r in knn)
        + (" (the same in every round: the demo is seeded)." if len(knn) == 1 else "."),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_result_args(ap)
    a = ap.parse_args(argv)
    if a.render:
        print(render(a.render))
        return 0

    runs = []
    for r in range(a.rounds):
        runs.append(one_round())
        print(f"round {r + 1}: {runs[-1]}", file=sys.stderr, flush=True)
    command = f".venv/bin/python scripts/time_demo.py --rounds {a.rounds} --out {a.out}"
    print(write_result(a.out, {"command": command, "rounds": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
