"""The shared side-by-side tool's protocol with compiled mimkit rows added (``mkc_X``: ``torch.compile`` of the
``mk_X`` model, inductor on CPU).

Each row runs in its own process through the tool's own ``run_one`` (same batch, optimizer, warm-up and timing; the
first warm-up step of a compiled row includes the compilation and is not timed), rows alternate over rounds, and the
output is the tool's ``RESULT`` lines, read by ``scripts/reference_ratios.py``:

    .venv/bin/python scripts/side_by_side_compiled.py --tool ../shared/tools/side_by_side.py --ref-dir REF \\
        --rows ref_umae_swin_t,mk_umae_swin_t,mkc_umae_swin_t --rounds 3 > compiled.log
    .venv/bin/python scripts/reference_ratios.py compiled.log --markdown
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time


def load_tool(path: str):
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def run_one(tool, row: str, ref_dir: str, warmup: int, steps: int) -> None:
    if row.startswith("mkc_"):
        tool.ROWS[row] = tool.ROWS["mk_" + row[len("mkc_") :]]
        eager = tool.build_mk

        def build_compiled(model, batch_size, px):
            import torch

            net, opt, batch, step = eager(model, batch_size, px)
            compiled = torch.compile(net)
            return net, opt, batch, lambda b: compiled(b)[0]

        tool.build_mk = build_compiled
    tool.run_one(row, ref_dir, warmup, steps)


def add_tool_args(ap: argparse.ArgumentParser, warmup: int, steps: int) -> None:
    """The options of every side-by-side script: the shared tool, the released code, rounds, warm-up and timed steps
    per row, and the hidden ``--one ROW`` of a row's own process."""
    ap.add_argument("--tool", required=True, help="path of ../shared/tools/side_by_side.py")
    ap.add_argument("--ref-dir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--one", help=argparse.SUPPRESS)


def run_rounds(script: str, a: argparse.Namespace, rows: list[str], extra: list[str], deadline: float = 0.0) -> None:
    """Every row in its own process (``script --one ROW`` with ``a``'s options and ``extra``), rows alternating in
    order over ``a.rounds``; prints each row's RESULT line or its failure. No row starts after ``deadline`` (unix
    time; 0: none)."""
    for rnd in range(a.rounds):
        for row in rows if rnd % 2 == 0 else rows[::-1]:
            if deadline and time.time() > deadline:
                print(f"# deadline reached in round {rnd + 1}: stopped", flush=True)
                return
            cmd = [sys.executable, script, "--tool", a.tool, "--ref-dir", a.ref_dir, "--one", row]
            cmd += ["--warmup", str(a.warmup), "--steps", str(a.steps), *extra]
            p = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            print(lines[0] if lines else f"{row}: FAILED\n{p.stderr[-2000:]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tool_args(ap, warmup=2, steps=5)
    ap.add_argument("--rows", required=True, help="comma-separated rows of the tool, plus mkc_X for compiled mk_X")
    a = ap.parse_args()
    tool = load_tool(a.tool)
    if a.one:
        return run_one(tool, a.one, a.ref_dir, a.warmup, a.steps)
    run_rounds(__file__, a, a.rows.split(","), ["--rows", a.rows])


if __name__ == "__main__":
    main()
