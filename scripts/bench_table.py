"""Record a ``mimkit bench`` run as a result file, and render one as a Markdown table for docs/benchmarks.md.

    .venv/bin/python scripts/bench_table.py record docs/benchmarks/lomar_vs_mae.json -- \
        --models mae_vit_base_patch16 lomar_vit_base_patch16 --img-size 224 384 448 --rounds 3 ...
    .venv/bin/python scripts/bench_table.py render docs/benchmarks/lomar_vs_mae.json

``record`` runs ``mimkit bench ... --json`` with this Python and writes {date, machine, command, rows}; ``render``
prints the command, the date and machine, and one row per model and size: time per step, images/s, the speed ratio
against the first model at that size (median of the alternating rounds, with the range), peak memory and its
ratio, and encoder / decoder forward GFLOPs per image. `make bench` records, `make docs` renders
(scripts/render_docs.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores {cpu}, {gpu}; torch {torch.__version__}"


def add_result_args(ap: argparse.ArgumentParser, rounds: int = 3) -> None:
    """The options every measuring script of docs/benchmarks.md shares: --rounds, --out, --render."""
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
    ap.add_argument("--out", type=Path, help="write the result file here (JSON)")
    ap.add_argument("--render", type=Path, help="print a result file as Markdown and stop")


def write_result(out: Path | None, result: dict) -> str:
    """``result`` stamped with today's date and this machine, as JSON text; written to ``out`` when given (the
    result files of docs/benchmarks/ and docs/results/ all start this way)."""
    stamped = {"date": datetime.date.today().isoformat(), "machine": machine(), **result}
    text = json.dumps(stamped, indent=1) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


# The mimkit command line of this checkout, in a fresh process (python -c ENTRY args...).
ENTRY = "import sys; from mimkit.cli import main; sys.exit(main())"


def run_bench(bench_args: list[str]) -> list[dict]:
    """``mimkit bench ARGS --json`` in its own process: its result rows (its stderr and exit code on failure)."""
    argv = [sys.executable, "-c", ENTRY, "bench", *bench_args, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout[done.stdout.index("[") :])


def record(out: Path, bench_args: list[str]) -> None:
    """Run the benchmark and write the result file."""
    write_result(out, {"command": "mimkit bench " + shlex.join(bench_args), "rows": run_bench(bench_args)})


def _ratio(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    spread = row.get(key + "_range")
    if spread and row.get("rounds", 1) > 1:
        return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"
    return f"{value:.2f}x"


def render(path: Path) -> str:
    """The Markdown block for one result file."""
    result = json.loads(path.read_text())
    rows = result["rows"]
    rounds = max(r.get("rounds", 1) for r in rows)
    lines = [
        f"{result['date']}, {result['machine']}, {rounds} alternating rounds (median ratio, range over rounds):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        "| model | px | ms/step | img/s | speed vs first | peak MB | memory vs first | encoder GFLOPs "
        "| decoder GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['img_size']} | {1000 * r['step_time_s']:.0f} | {r['images_per_s']:.2f} | "
            f"{_ratio(r, 'speed_vs_first')} | {r['peak_memory_mb']:.0f} | {r.get('memory_vs_first', 1.0):.2f}x | "
            f"{r['encoder_gflops']:.3g} | {r['decoder_gflops']:.3g} |"
        )
    lines.append("")
    lines.append(
        "ms/step and img/s are from the median round; GFLOPs are one forward pass per image (encoder, then decoder or "
        "head), counted by torch's FLOP counter; memory is the " + rows[0]["memory_kind"].replace("_", " ") + "."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="run mimkit bench and write a result file")
    rec.add_argument("out", type=Path)
    rec.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then mimkit bench's options")
    ren = sub.add_parser("render", help="print a result file as Markdown")
    ren.add_argument("file", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        record(args.out, bench_args)
    else:
        print(render(args.file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
