"""Page faults, system time and wall time of mimkit training steps with freed host memory left to the C library,
kept for reuse, or kept in a heap of 2 MiB pages (``--host-memory system`` / ``keep``, the latter with
``--host-huge-pages off`` / ``auto``; mimkit/engine/host_memory.py), for docs/benchmarks.md.

Every (model, setting) runs in its own process (2 warm-up steps, then ``--steps`` timed steps of zero_grad + forward
+ backward + the fused AdamW update on random images, as the side-by-side tool's step; ``keep-huge`` first starts
itself again with glibc's tunable, as the ``mimkit`` command does), the settings alternating in order over
``--rounds``; the speed-up is the first setting's time / a setting's time per round, median and range.

    .venv/bin/python scripts/host_memory_faults.py simmim_swin_tiny_256 umae_pvt_small_256 --rounds 3 \\
        --json docs/benchmarks/host_memory.json
    .venv/bin/python scripts/host_memory_faults.py umae_pvt_small_256 simmim_pvt_small_256 umae_swin_tiny_256 \\
        mae_vit_base_patch16 --settings keep,keep-huge --rounds 5 --steps 5 --json docs/benchmarks/host_huge_pages.json
    .venv/bin/python scripts/host_memory_faults.py --render docs/benchmarks/host_memory.json   # its Markdown table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SETTINGS = ("system", "keep", "keep-huge")


def one(model: str, setting: str, batch_size: int, steps: int) -> dict:
    """Steps of ``model`` in this process under ``setting``: minor page faults, system and user CPU seconds and wall
    seconds per step."""
    import resource

    import torch
    from _train_step import build, train_step

    from mimkit.engine.host_memory import huge_page_heap, huge_page_mb, keep_freed_memory, restart_with_huge_page_heap

    if setting == "keep-huge":
        restart_with_huge_page_heap()  # this process again, with the tunable (if it changes something)
    if setting in ("keep", "keep-huge"):
        keep_freed_memory()
    net, opt, batches = build(model, batch_size, batches=2 + steps)

    def step(b):
        train_step(net, opt, b).item()

    for b in batches[:2]:
        step(b)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in batches[2:]:
        step(b)
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {
        "model": model,
        "setting": setting,
        "batch_size": batch_size,
        "steps": steps,
        "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "system_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
        "user_s_per_step": (r1.ru_utime - r0.ru_utime) / steps,
        "wall_s_per_step": wall / steps,
        "huge_page_heap": huge_page_heap(),
        "anon_huge_mb": huge_page_mb(),  # this process's memory in 2 MiB pages after the steps
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def render(path: str) -> None:
    """The Markdown table of a result file: per model and setting, medians over rounds (MB in 2 MiB pages where
    recorded); each setting's speed-up over the model's first setting, per round."""
    with open(path) as f:
        res = json.load(f)
    runs = res["runs"]
    cols = ("model", "host memory", "page faults per step", "system s per step", "MB in 2 MiB pages", "s per step")
    print(f"| {' | '.join(cols)} | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in runs):
        by = {s: [r for r in runs if r["model"] == model and r["setting"] == s] for s in SETTINGS}
        by = {s: rs for s, rs in by.items() if rs}
        first = next(iter(by))
        for s, rs in by.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("faults_per_step", "system_s_per_step")}
            huge = f"{statistics.median(r['anon_huge_mb'] for r in rs):,.0f}" if "anon_huge_mb" in rs[0] else "-"
            wall = [r["wall_s_per_step"] for r in rs]
            n = min(len(by[first]), len(rs))
            speed = [by[first][i]["wall_s_per_step"] / rs[i]["wall_s_per_step"] for i in range(n)]
            cell = f"**{statistics.median(speed):.2f}x** ({min(speed):.2f}-{max(speed):.2f}) over {first}, {n} rounds"
            print(
                f"| {model} | {s} | {med['faults_per_step']:,.0f} | {med['system_s_per_step']:.2f} | {huge} | "
                f"{statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | {cell if s != first else '-'} |"
            )


def main() -> None:
    from _train_step import add_alternating_args, answered_here, run_alternating, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="mimkit method names (mimkit models)")
    ap.add_argument("--settings", default="system,keep", help=f"comma-separated, of {', '.join(SETTINGS)}")
    add_alternating_args(ap, steps=4)
    a = ap.parse_args()
    if answered_here(a, render, one):
        return
    if not a.models:
        ap.error("give at least one model")
    settings = tuple(a.settings.split(","))
    if set(settings) - set(SETTINGS):
        ap.error(f"--settings {a.settings}: each one of {', '.join(SETTINGS)}")
    write_results(a.json, {"runs": run_alternating(__file__, a.models, settings, a.rounds, a.steps, a.batch_size)})


if __name__ == "__main__":
    main()
