"""The shared side-by-side tool's protocol with more rows: compiled mimkit (``mkc_X``: ``torch.compile`` of the
``mk_X`` model, inductor on CPU) and rows run with freed host memory kept for reuse in a heap of 2 MiB pages where the
system allows, the trainer's defaults ``--host-memory keep`` and ``--host-huge-pages auto`` (``mkk_X``: mimkit as
``mimkit pretrain`` runs it; ``refk_X``, ``hfk_X``: the reference code with the same settings, which it does not make
itself; ``mkck_X``: both compiled and kept; mimkit/engine/host_memory.py; the huge pages since 2026-12-02).

Each row runs in its own process through the tool's own ``run_one`` (same batch, optimizer, warm-up and timing; the
first warm-up step of a compiled row includes the compilation and is not timed), rows alternate over rounds, and the
output is the tool's ``RESULT`` lines, read by ``scripts/reference_ratios.py``, with the machine's matrix rate before
every round and after the last (``scripts/machine_rate.py``):

    .venv/bin/python scripts/side_by_side_compiled.py --tool ../shared/tools/side_by_side.py --ref-dir REF \\
        --rows ref_umae_swin_t,mk_umae_swin_t,mkc_umae_swin_t,mkk_umae_swin_t,refk_umae_swin_t --rounds 3 > out.log
    .venv/bin/python scripts/reference_ratios.py out.log --markdown
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from _results import result_line, run_for_result
from machine_rate import ROW as MACHINE_RATE


def load_tool(path: str):
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def variant(row: str) -> tuple[str, bool, bool]:
    """``KIND[c][k]_X`` -> (the tool's row ``KIND_X``, compiled, host memory kept); KIND is mk, ref or hf."""
    prefix, _, suffix = row.partition("_")
    kind = next(k for k in ("mk", "ref", "hf", "") if prefix.startswith(k))
    flags = prefix[len(kind) :]
    if not kind or set(flags) - {"c", "k"} or len(set(flags)) != len(flags) or ("c" in flags and kind != "mk"):
        raise SystemExit(f"--rows: {row!r} is not a row of the tool with the prefixes mkc_, mkk_, mkck_, refk_, hfk_")
    return f"{kind}_{suffix}", "c" in flags, "k" in flags


def checked_rows(tool, rows: str) -> list[str]:
    """The comma-separated ``--rows``, each a row of the tool with a known prefix (else exits with a message)."""
    for row in rows.split(","):
        if variant(row)[0] not in tool.ROWS:
            raise SystemExit(f"--rows: {row!r}: the tool has no row {variant(row)[0]!r}")
    return rows.split(",")


def run_one(tool, row: str, ref_dir: str, warmup: int, steps: int) -> None:
    base, compiled, kept = variant(row)
    tool.ROWS[row] = tool.ROWS[base]
    if kept:
        from mimkit.engine.host_memory import as_the_command_runs

        as_the_command_runs()  # this row's process again with the tunable, then freed memory kept
    if compiled:
        eager = tool.build_mk

        def build_compiled(model, batch_size, px):
            import torch

            net, opt, batch, step = eager(model, batch_size, px)
            fast = torch.compile(net)
            return net, opt, batch, lambda b: fast(b)[0]

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


def print_machine_rate() -> None:
    """The CPU's matrix rate now (scripts/machine_rate.py, in its own process): its RESULT line, for the log."""
    result, p = run_for_result(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "machine_rate.py")]
    )
    print(result_line(result) if result else f"{MACHINE_RATE}: FAILED\n{p.stderr[-2000:]}", flush=True)


def run_rounds(
    script: str, a: argparse.Namespace, rows: list[str], extra: list[str], deadline: float = 0.0, probe: bool = False
) -> list[str]:
    """Every row in its own process (``script --one ROW`` with ``a``'s options and ``extra``), rows alternating in
    order over ``a.rounds``; prints each row's RESULT line or its failure, and returns the results. No row starts
    after ``deadline`` (unix time; 0: none). With ``probe`` the CPU's matrix rate is printed before every round and
    after the last (``machine_rate`` lines, not among the results)."""
    results = []
    for rnd in range(a.rounds):
        if probe:
            print_machine_rate()
        for row in rows if rnd % 2 == 0 else rows[::-1]:
            if deadline and time.time() > deadline:
                print(f"# deadline reached in round {rnd + 1}: stopped", flush=True)
                return results
            cmd = [sys.executable, script, "--tool", a.tool, "--ref-dir", a.ref_dir, "--one", row]
            cmd += ["--warmup", str(a.warmup), "--steps", str(a.steps), *extra]
            result, p = run_for_result(cmd)
            print(result_line(result) if result else f"{row}: FAILED\n{p.stderr[-2000:]}", flush=True)
            results += [result] if result else []
    if probe:
        print_machine_rate()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tool_args(ap, warmup=2, steps=5)
    ap.add_argument(
        "--rows",
        required=True,
        help="comma-separated rows of the tool, plus mkc_X (compiled mk_X), mkk_X, refk_X, hfk_X (host memory kept) "
        "and mkck_X (both)",
    )
    a = ap.parse_args()
    tool = load_tool(a.tool)
    if a.one:
        return run_one(tool, a.one, a.ref_dir, a.warmup, a.steps)
    run_rounds(__file__, a, checked_rows(tool, a.rows), ["--rows", a.rows], probe=True)


if __name__ == "__main__":
    main()
