"""Does the loader keep up with the model? The model's training rate on synthetic batches (`mimkit bench`) against
real pretraining runs that read and augment images with 0, 1 and 2 loader workers, alternating rounds; a result file
for docs/benchmarks.md ("Data loading").

    .venv/bin/python scripts/loader_vs_model.py --data /tmp/bench-data/shards --rounds 3 \
        --out docs/benchmarks/loader_vs_model.json
    .venv/bin/python scripts/loader_vs_model.py --render docs/benchmarks/loader_vs_model.json

A pretraining run's rate is the median of its logged ``images_per_s`` windows after the first (which holds the
start-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_table import ENTRY, add_result_args, run_bench, write_result  # noqa: E402


def bench_rate(model: str, batch: int, img_size: int) -> float:
    args = ["--models", model, "--batch-size", str(batch), "--img-size", str(img_size), "--precision", "fp32",
            "--steps", "15", "--warmup", "2"]  # fmt: skip
    return run_bench(args)[0]["images_per_s"]


def pretrain_rate(data: str, model: str, batch: int, img_size: int, workers: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-c", ENTRY, "pretrain", "--data", data, "--model", model, "--batch-size", str(batch),
                "--img-size", str(img_size), "--max-steps", str(steps), "--num-workers", str(workers),
                "--log-every", "10", "--precision", "fp32", "--no-progress", "--no-tensorboard",
                "--save-every-minutes", "1000", "--output", tmp]  # fmt: skip
        subprocess.run(argv, capture_output=True, text=True, check=True)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in recs if "images_per_s" in r]
    return statistics.median(rates[1:] or rates)


def render(path: Path) -> str:
    res = json.loads(path.read_text())

    def cell(vals: list[float]) -> str:
        return f"{statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})"

    lines = [
        f"{res['date']}, {res['machine']}; `{res['model']}`, {res['img_size']} px, batch {res['batch_size']}, fp32, "
        f"{len(res['bench'])} alternating rounds (images/s, median and range):",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "| what | images/s |",
        "|---|---|",
        f"| the model alone (`mimkit bench`, synthetic batches) | {cell(res['bench'])} |",
    ]
    for w, vals in res["pretrain"].items():
        lines.append(f"| `mimkit pretrain` on `{res['data_name']}`, {w} loader worker(s) | {cell(vals)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--model", default="umae_swin_pico_128")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    add_result_args(ap)
    a = ap.parse_args(argv)
    if a.render:
        print(render(a.render))
        return 0
    if not a.data:
        ap.error("--data is required to measure")

    bench: list[float] = []
    runs: dict[str, list[float]] = {str(w): [] for w in a.workers}
    for r in range(a.rounds):
        jobs = ["bench", *map(str, a.workers)]
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            if job == "bench":
                bench.append(bench_rate(a.model, a.batch_size, a.img_size))
            else:
                runs[job].append(pretrain_rate(a.data, a.model, a.batch_size, a.img_size, int(job), a.steps))
            print(f"round {r + 1}: {job} done", file=sys.stderr, flush=True)
    res = {
        "model": a.model,
        "img_size": a.img_size,
        "batch_size": a.batch_size,
        "data_name": Path(a.data).name,
        "command": f".venv/bin/python scripts/loader_vs_model.py --data {a.data} --rounds {a.rounds} --out {a.out}",
        "bench": bench,
        "pretrain": runs,
    }
    print(write_result(a.out, res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
