"""Kill a real `mimkit pretrain` with SIGKILL at random steps (and once in the middle of a checkpoint write), resume it
each time, and check that it ends bit-identical to an uninterrupted run. Prints a JSON report for
docs/reliability.md. Uses tests/faults/inject.py (the real CLI plus fault switches) and a synthetic image folder.

    .venv/bin/python scripts/kill_soak.py --kills 20 --out runs/kill_soak
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.engine.metrics import truncate_metrics

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "faults"))
from harness import ENV, INJECT, ckpt_steps, final_weights, logged_steps, run_args  # noqa: E402


def make_images(root: Path, n: int = 48) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((40, 44, 3)) * 255).astype(np.uint8)).save(root / f"{i:03d}.png")


def args_for(data: Path, out: Path, epochs: int) -> list[str]:
    return run_args(data, out, epochs=epochs)


def last_step(out: Path) -> int:
    return (logged_steps(out) or [0])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/kill_soak")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    data = root / "images"
    make_images(data)
    steps_per_epoch, total = 12, 12 * args.epochs
    ref = root / "reference"
    subprocess.run(
        [sys.executable, INJECT, *args_for(data, ref, args.epochs)], env=ENV, check=True, capture_output=True
    )
    run = root / "killed"
    rng = random.Random(args.seed)
    report, done = [], 0
    for k in range(args.kills):
        startup = rng.random() < 0.1  # a kill while the process is starting or resuming
        target = min(total - 1, done + rng.randint(1, 2 * steps_per_epoch))
        env = dict(ENV, FAULT_STEP_SLEEP="0.02")
        mid_write = k == args.kills // 2
        if mid_write:
            env["FAULT_KILL_IN_SAVE"] = "1"
        complete = ckpt_steps(run)
        proc = subprocess.Popen(
            [sys.executable, INJECT, *args_for(data, run, args.epochs)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        t0 = time.time()
        if startup:
            time.sleep(rng.uniform(0.5, 3.0))
        while not mid_write and not startup and proc.poll() is None and time.time() - t0 < 120:
            if last_step(run) >= target:
                break
            time.sleep(0.005)
        killed_after = last_step(run)
        verified_before = ckpt_steps(run)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        restart = max(ckpt_steps(run) or [0])
        truncate_metrics(run / "metrics.jsonl", restart)  # what the next start does; progress is measured after it
        lost_good = [s for s in set(complete) | set(verified_before) if s > restart]
        report.append(
            {
                "kill": k,
                "mid_write": mid_write,
                "startup": startup,
                "killed_after_step": killed_after,
                "restart_step": restart,
                "work_lost_steps": max(0, killed_after - restart),
                "good_checkpoints_lost": len(lost_good),
            }
        )
        done = restart
        if killed_after >= total:
            break
    proc = subprocess.run(
        [sys.executable, INJECT, *args_for(data, run, args.epochs)], env=ENV, capture_output=True, text=True
    )
    a, b = final_weights(ref), final_weights(run)
    exact = a["step"] == b["step"] == total and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lost = [r["work_lost_steps"] for r in report]
    print(
        json.dumps(
            {
                "kills": len(report),
                "mid_write_kills": sum(r["mid_write"] for r in report),
                "startup_kills": sum(r["startup"] for r in report),
                "save_interval_steps": steps_per_epoch,
                "max_work_lost_steps": max(lost),
                "mean_work_lost_steps": round(sum(lost) / len(lost), 2),
                "good_checkpoints_lost": sum(r["good_checkpoints_lost"] for r in report),
                "final_rc": proc.returncode,
                "bit_identical_to_uninterrupted": exact,
                "per_kill": report,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
