"""Per-round speed ratios from the output of the shared side-by-side tool (``../shared/tools/side_by_side.py``).

The tool runs every row in its own process and alternates the row order over rounds, then prints one ratio of the
medians over all rounds. This script reads the ``RESULT`` lines it printed (one per row and round, in run order) and
gives, for each pair of rows, the ratio of the two rows' median step times in every round: the median of those
ratios and their range, the figure docs/benchmarks.md reports.

    .venv/bin/python ../shared/tools/side_by_side.py --ref-dir REF --rounds 3 > side_by_side.log
    .venv/bin/python scripts/reference_ratios.py side_by_side.log [--markdown]
    .venv/bin/python scripts/reference_ratios.py side_by_side.log --pair mk_simmim_swin_t,mk_umae_swin_t  # any two rows
    .venv/bin/python scripts/reference_ratios.py --history docs/benchmarks/side_by_side_5rounds*.log  # run by run

Each ratio also carries the two rows' peak memory growth (median over rounds) and its ratio (first / second).
``--history`` prints one line per log instead: its header (date, commit) and, for each model, the speed-up of one
kind of mimkit row (``--kind``, default ``mkk``: as ``mimkit pretrain`` runs) over the reference as released. Where a
log holds the machine's matrix rate (``machine_rate`` lines of scripts/machine_rate.py, printed around the rounds by
scripts/side_by_side_compiled.py), both give its median and range, how fast the machine ran during that run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

from _results import results_in
from machine_rate import ROW as MACHINE_RATE


def pairs_of(rows) -> list[tuple[str, str]]:
    """(reference row, mimkit row) for every mimkit row (``mk_X`` eager, ``mkc_X`` compiled, ``mkk_X`` and ``mkck_X``
    with host memory kept; scripts/side_by_side_compiled.py) whose reference as released (``ref_X``, the released
    code, else ``hf_X``, transformers) is present."""
    out = []
    for row in rows:
        kind, _, suffix = row.partition("_")
        if kind in ("mk", "mkc", "mkk", "mkck"):
            ref = next((f"{k}_{suffix}" for k in ("ref", "hf") if f"{k}_{suffix}" in rows), None)
            if ref:
                out.append((ref, row))
    return out


def per_round_medians(lines: list[str], key: str = "times") -> dict[str, list[float]]:
    """Row -> its median step time (s) in each round, in run order (``key="peak_growth_MB"``: its memory)."""
    rows: dict[str, list[float]] = defaultdict(list)
    for d in results_in(lines):
        value = d.get(key)
        if value is not None:
            rows[d["row"]].append(statistics.median(value) if isinstance(value, list) else float(value))
    return rows


def machine_rate(lines: list[str]) -> str:
    """``"372 GFLOP/s (365-380)"``: median and range of the log's ``machine_rate`` probes; "-" where it has none."""
    rates = [d["gflops"] for d in results_in(lines) if d.get("row") == MACHINE_RATE and "gflops" in d]
    if not rates:
        return "-"
    return f"{statistics.median(rates):.0f} GFLOP/s ({min(rates):.0f}-{max(rates):.0f})"


def ratios(rows: dict[str, list[float]], pairs=None, memory: dict[str, list[float]] | None = None) -> list[dict]:
    """For each pair: reference time / mimkit time in every round both ran, its median and range (and the memory
    ratio of the medians, where ``memory`` is given)."""
    out = []
    for ref, mine in pairs if pairs is not None else pairs_of(rows):
        a, b = rows.get(ref, []), rows.get(mine, [])
        n = min(len(a), len(b))
        if not n:
            continue
        r = [a[i] / b[i] for i in range(n)]
        out.append(
            dict(
                reference=ref,
                mimkit=mine,
                rounds=n,
                reference_ms=round(statistics.median(a[:n]) * 1e3),
                mimkit_ms=round(statistics.median(b[:n]) * 1e3),
                ratio=round(statistics.median(r), 3),
                low=round(min(r), 3),
                high=round(max(r), 3),
            )
        )
        if memory and memory.get(ref) and memory.get(mine):
            ma, mb = statistics.median(memory[ref]), statistics.median(memory[mine])
            out[-1].update(reference_mb=round(ma), mimkit_mb=round(mb), memory_ratio=round(ma / mb, 3))
    return out


HISTORY_MODELS = {
    "umae_swin_t": "UM-MAE Swin-T",
    "simmim_swin_t": "SimMIM Swin-T",
    "umae_pvt_s": "UM-MAE PVT-S",
    "simmim_pvt_s": "SimMIM PVT-S",
    "mae_vit_b": "MAE ViT-B (ViTMAE)",
}


def history(paths: list[str], kind: str = "mkk") -> str:
    """Markdown: one line per log (the commit its ``#`` header names after "at", and its file name), one column per
    model of ``HISTORY_MODELS``, each the median (range) over rounds of reference time / time of the ``kind`` row,
    and the machine's matrix rate during the run (:func:`machine_rate`)."""
    import re

    head = "| commit | log | " + " | ".join(HISTORY_MODELS.values()) + " | rounds | machine rate |"
    out = [head, "|---" * (len(HISTORY_MODELS) + 4) + "|"]
    for path in paths:
        with open(path) as f:
            lines = f.read().splitlines()
        header = next((x for x in lines if x.startswith("#")), "")
        commit = re.search(r"\bat ([0-9a-f]{7,40})\b", header)
        rows = per_round_medians(lines)
        pairs = [(f"ref_{m}" if f"ref_{m}" in rows else f"hf_{m}", f"{kind}_{m}") for m in HISTORY_MODELS]
        found = {t["mimkit"]: t for t in ratios(rows, pairs)}
        cells = []
        for m in HISTORY_MODELS:
            t = found.get(f"{kind}_{m}")
            cells.append(f"{t['ratio']:.2f}x ({t['low']:.2f}-{t['high']:.2f})" if t else "-")
        rounds = sorted({t["rounds"] for t in found.values()})
        name = path.rsplit("/", 1)[-1]
        out.append(
            f"| {commit.group(1) if commit else '-'} | `{name}` | "
            + " | ".join(cells)
            + f" | {'/'.join(map(str, rounds)) or '-'} | {machine_rate(lines)} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", nargs="?", help="the side-by-side tool's output")
    ap.add_argument("--history", nargs="+", metavar="LOG", help="one line per log: the speed-up of each model")
    ap.add_argument("--kind", default="mkk", help="with --history: the mimkit rows to read (mk, mkk, mkc, mkck)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--pair", action="append", metavar="A,B", help="rows to compare (time of A / time of B)")
    a = ap.parse_args(argv)
    if a.history:
        print(history(a.history, a.kind))
        return
    if not a.log:
        ap.error("give the tool's output (LOG) or --history LOG...")
    with open(a.log) as f:
        lines = f.read().splitlines()
    pairs = [tuple(p.split(",", 1)) for p in a.pair] if a.pair else None
    table = ratios(per_round_medians(lines), pairs, per_round_medians(lines, "peak_growth_MB"))
    if not a.markdown:
        print(json.dumps(table, indent=1))
        return
    first, second = ("first row", "second row") if pairs else ("reference row", "mimkit row")
    print(f"| {first} | {second} | ms | ms | speed-up, median (range) | rounds | peak MB | peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(
            f"| {t['reference']} | {t['mimkit']} | {t['reference_ms']} | {t['mimkit_ms']} | "
            f"**{t['ratio']:.2f}x** ({t['low']:.2f}-{t['high']:.2f}) | {t['rounds']} | "
            f"{t.get('reference_mb', '-')} | {t.get('mimkit_mb', '-')} | "
            + (f"{t['memory_ratio']:.2f}x |" if "memory_ratio" in t else "- |")
        )
    rate = machine_rate(lines)
    if rate != "-":
        print(f"\nMachine rate around the rounds (scripts/machine_rate.py): {rate}.")


if __name__ == "__main__":
    main()
