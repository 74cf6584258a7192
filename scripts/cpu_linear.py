"""PyTorch's linear against oneDNN's on the CPU (mimkit/models/layers/mlp.py), for docs/benchmarks.md: each product
shape alone, and whole training steps with ``--cpu-linear aten`` / ``auto``.

``--sweep``: for each (rows, in, out) one linear layer forward and backward (input, weight and bias gradients), fp32,
timed with ``F.linear`` and with the oneDNN path whatever the shape, the two alternating over ``--rounds``; before
every timed call 400 MB are written, so that the operands come from memory as they do inside a training step (a
product alone, repeated, would find them in this machine's last-level cache). The speed-up is F.linear's time /
oneDNN's, median and range over rounds; ``chosen`` is what ``--cpu-linear auto`` takes (``uses_onednn``).

``MODEL ...``: every (model, setting) in its own process (freed host memory kept, as the trainer's default; 2 warm-up
steps, then ``--steps`` timed steps of zero_grad + forward + backward + the fused AdamW update on random images), the
two settings alternating in order over ``--rounds``; the speed-up is aten's time / auto's per round.

    .venv/bin/python scripts/cpu_linear.py --sweep --rounds 5 --json docs/benchmarks/cpu_linear_sweep.json
    .venv/bin/python scripts/cpu_linear.py simmim_pvt_small_256 umae_pvt_small_256 --rounds 4 \\
        --json docs/benchmarks/cpu_linear_steps.json
    .venv/bin/python scripts/cpu_linear.py --render docs/benchmarks/cpu_linear_sweep.json   # its Markdown table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SETTINGS = ("aten", "auto")
PAIRS = [(64, 256), (256, 64), (64, 512), (512, 64), (96, 384), (384, 96), (128, 512), (512, 128), (128, 1024)]
PAIRS += [(1024, 128), (192, 768), (768, 192), (320, 1280), (1280, 320)]
ROWS = (4096, 8192, 16384, 32768)


def sweep(rounds: int) -> list[dict]:
    """Per shape: F.linear's and oneDNN's times of one forward and backward, per round."""
    import torch
    import torch.nn.functional as F

    from mimkit.engine.host_memory import keep_freed_memory
    from mimkit.models.layers.mlp import onednn_linear, uses_onednn

    keep_freed_memory()
    flush = torch.empty(100 * 2**20)  # 400 MB
    shapes = [(m, i, o) for m in ROWS for i, o in PAIRS if m * max(i, o) <= 32768 * 1024] + [(1576, 768, 3072)]
    out = []
    for rows, i, o in shapes:
        torch.manual_seed(0)
        x = torch.randn(rows, i, requires_grad=True)
        w, b = torch.randn(o, i, requires_grad=True), torch.randn(o, requires_grad=True)
        dy = torch.randn(rows, o)
        ways = {"aten": F.linear, "onednn": onednn_linear}
        times: dict[str, list[float]] = {k: [] for k in ways}
        for rnd in range(rounds + 1):  # the first round warms up
            for name, fn in ways.items() if rnd % 2 == 0 else list(ways.items())[::-1]:
                x.grad = w.grad = b.grad = None
                flush.fill_(1.0)
                t0 = time.perf_counter()
                fn(x, w, b).backward(dy)
                if rnd:
                    times[name].append(time.perf_counter() - t0)
        out.append(dict(rows=rows, in_features=i, out_features=o, chosen=uses_onednn(rows, i, o), **times))
        print(json.dumps(out[-1]), flush=True)
    return out


def one(model: str, setting: str, batch_size: int, steps: int) -> dict:
    """Seconds per step of ``model`` in this process with ``--cpu-linear setting``."""
    import torch
    from _train_step import build, train_step

    from mimkit.engine.host_memory import keep_freed_memory
    from mimkit.models.layers import set_cpu_linear

    keep_freed_memory()
    set_cpu_linear(setting)
    net, opt, batches = build(model, batch_size, batches=2 + steps)
    times = []
    for k, b in enumerate(batches):
        t0 = time.perf_counter()
        train_step(net, opt, b).item()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return dict(model=model, setting=setting, batch_size=batch_size, s_per_step=statistics.median(times),
                threads=torch.get_num_threads(), torch=torch.__version__)  # fmt: skip


def _range(values: list[float]) -> str:
    return f"**{statistics.median(values):.2f}x** ({min(values):.2f}-{max(values):.2f})"


def render(path: str) -> None:
    """The Markdown table of a result file (a sweep or a steps run)."""
    with open(path) as f:
        res = json.load(f)
    if "shapes" in res:
        print("| rows | in | out | F.linear ms | oneDNN ms | speed-up | `auto` takes oneDNN |")
        print("|---|---|---|---|---|---|---|")
        for s in res["shapes"]:
            ratio = [a / o for a, o in zip(s["aten"], s["onednn"])]
            print(
                f"| {s['rows']} | {s['in_features']} | {s['out_features']} | {statistics.median(s['aten']) * 1e3:.2f} "
                f"| {statistics.median(s['onednn']) * 1e3:.2f} | {_range(ratio)} | {'yes' if s['chosen'] else '-'} |"
            )
        return
    runs = res["runs"]
    print("| model | aten s per step | auto s per step | speed-up of auto | rounds |")
    print("|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in runs):
        by = {s: [r["s_per_step"] for r in runs if r["model"] == model and r["setting"] == s] for s in SETTINGS}
        n = min(len(v) for v in by.values())
        speed = [by["aten"][k] / by["auto"][k] for k in range(n)]
        cells = " | ".join(", ".join(f"{t:.3f}" for t in by[s]) for s in SETTINGS)
        print(f"| {model} | {cells} | {_range(speed)} | {n} |")


def main() -> None:
    from _train_step import add_alternating_args, answered_here, run_alternating, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="mimkit method names for whole steps (mimkit models)")
    ap.add_argument("--sweep", action="store_true", help="time single linear layers of many shapes instead")
    add_alternating_args(ap, steps=5)
    a = ap.parse_args()
    if answered_here(a, render, one):
        return
    if a.sweep:
        write_results(a.json, {"shapes": sweep(a.rounds)})
    elif a.models:
        write_results(a.json, {"runs": run_alternating(__file__, a.models, SETTINGS, a.rounds, a.steps, a.batch_size)})
    else:
        ap.error("give --sweep or at least one model")


if __name__ == "__main__":
    main()
