"""Where two codes' training steps differ: milliseconds per step (forward + backward) of each group of blocks
(encoder blocks by width, decoder blocks, patch merges) and of the rest (embedding, masking, glue, loss, head,
update), for rows of the shared side-by-side tool, each in its own process, rows alternating over rounds.

    .venv/bin/python scripts/stage_times.py --tool ../shared/tools/side_by_side.py --ref-dir REF \\
        --rows ref_umae_pvt_s,mkk_umae_pvt_s --rounds 3 > docs/benchmarks/stage_times_pvt.log
    .venv/bin/python scripts/stage_times.py --render docs/benchmarks/stage_times_pvt.log   # the table again

Rows are the tool's (``ref_X``, ``mk_X``) with scripts/side_by_side_compiled.py's ``k`` prefix (host memory kept);
each row is built by the tool's own builders and stepped as its ``run_one`` steps it. A unit is a module whose class
or a base class has a name ending in ``Block`` (grouped as "decoder blocks" when its name has "decoder", else by its
first LayerNorm's width) or a patch merge (a class name with ``Merg``, or a later stage's ``patch_embed`` or its
``proj``); a unit inside another unit counts for itself only. Module hooks clock each unit's forward and backward
(CPU operations are synchronous, so the clocks are exact there); full backward hooks cost a little time per unit in
both codes alike, so the step is slower than the side-by-side's. Prints one RESULT line per process and a Markdown
table of medians with ranges.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re
import statistics
import sys
import time

from _results import print_result, results_in
from side_by_side_compiled import add_tool_args, checked_rows, load_tool, run_rounds, variant
from side_by_side_compiled import run_one as run_tool_row


def unit_group(name: str, module) -> str | None:
    """The group a module's time counts in, or None when it is not a unit."""
    from torch import nn

    classes = [c.__name__ for c in type(module).__mro__]  # the tool subclasses timm's Block for the reference
    m = re.search(r"stages\.(\d+)\.patch_embed(\.proj)?$", name)
    if "Merg" in classes[0] or (m and int(m.group(1)) > 0):
        return "patch merges"
    if not any(c.endswith("Block") for c in classes):
        return None
    if "decoder" in name:
        return "decoder blocks"
    width = next((n.normalized_shape[0] for n in module.modules() if isinstance(n, nn.LayerNorm)), 0)
    return f"encoder blocks, width {width}"


def hook_units(net, acc: dict[str, float]) -> None:
    """Accumulates each unit's exclusive seconds (its own minus its units') in ``acc`` (a defaultdict), by group."""
    stacks: dict[str, list[list[float]]] = {"f": [], "b": []}  # [start, seconds of nested units]

    def enter(way):
        return lambda *_: stacks[way].append([time.perf_counter(), 0.0])

    def leave(way, group):
        def hook(*_):
            start, nested = stacks[way].pop()
            spent = time.perf_counter() - start
            acc[group] += spent - nested
            if stacks[way]:
                stacks[way][-1][1] += spent

        return hook

    for name, module in net.named_modules():
        group = unit_group(name, module)
        if group:
            module.register_forward_pre_hook(enter("f"))
            module.register_forward_hook(leave("f", group))
            module.register_full_backward_pre_hook(enter("b"))
            module.register_full_backward_hook(leave("b", group))


def run_one(tool, row: str, ref_dir: str, warmup: int, steps: int) -> None:
    """The row as scripts/side_by_side_compiled.py runs it (the tool's ``run_one``: its builders, step loop and
    timing), with the units hooked on the built model and their clocks reset once the warm-up steps are done; prints
    a RESULT line of milliseconds per step."""
    base, compiled, _ = variant(row)
    if compiled:
        raise SystemExit(f"--rows: {row!r}: compiled rows have no module boundaries to clock")
    if tool.ROWS[base][0] not in ("ref", "mk"):
        raise SystemExit(f"--rows: {row!r}: only ref and mk rows")
    acc: dict[str, float] = collections.defaultdict(float)
    for name in ("build_ref", "build_mk"):
        setattr(tool, name, hooked(getattr(tool, name), acc, warmup))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_tool_row(tool, row, ref_dir, warmup, steps)
    times = results_in(out.getvalue())[0]["times"]
    ms = {g: round(s / steps * 1e3, 1) for g, s in sorted(acc.items())}
    step_ms = statistics.fmean(times) * 1e3
    ms["rest"] = round(step_ms - sum(ms.values()), 1)
    ms["step"] = round(step_ms, 1)
    print_result({"row": row, "ms": ms})


def hooked(build, acc: dict[str, float], warmup: int):
    """``build`` whose model has its units hooked into ``acc``, cleared after the optimizer's ``warmup``-th step."""

    def build_hooked(*args):
        net, opt, batch, step = build(*args)
        hook_units(net, acc)
        done = [0]

        def count(*_):
            done[0] += 1
            if done[0] == warmup:
                acc.clear()

        opt.register_step_post_hook(count)
        return net, opt, batch, step

    return build_hooked


def table(results: list[dict]) -> str:
    """Markdown: one line per group, one column per row, median (range) of the rounds."""
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        runs[r["row"]].append(r["ms"])
    rows = list(runs)
    units = {g for rs in runs.values() for r in rs for g in r} - {"rest", "step"}
    by_width = sorted(
        units, key=lambda g: (g.startswith("encoder"), int(g.rsplit(" ", 1)[-1]) if "width" in g else 0, g)
    )
    groups = by_width + ["rest", "step"]
    out = ["| ms per step | " + " | ".join(f"`{r}`" for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for g in groups:
        cells = []
        for r in rows:
            vals = [x[g] for x in runs[r] if g in x]
            cells.append(f"{statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})" if vals else "-")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--render":  # docs/benchmarks.md's generated block
        with open(sys.argv[2]) as f:
            print(table(results_in(f.read())))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tool_args(ap, warmup=2, steps=4)
    ap.add_argument("--rows", required=True, help="comma-separated ref_X / mk_X rows of the tool, k prefix allowed")
    ap.add_argument(  # taken before the parser above, alone: then no other option is needed
        "--render", metavar="LOG", help="alone: print the table of a recorded LOG and exit (docs/benchmarks.md)"
    )
    a = ap.parse_args()
    tool = load_tool(a.tool)
    if a.one:
        return run_one(tool, a.one, a.ref_dir, a.warmup, a.steps)
    print(table(run_rounds(__file__, a, checked_rows(tool, a.rows), ["--rows", a.rows])))


if __name__ == "__main__":
    main()
