"""Driving real `mimkit` processes for the fault tests and scripts/kill_soak.py: start one (through inject.py, the
real CLI plus optional faults) in its own process group, watch its progress, read what it kept."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
INJECT = str(HERE / "inject.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_args(data, out, *extra, model="fault_mae_pico", epochs=4):
    """A small `mimkit pretrain` job: batch 4, fp32, 2 loader workers, a checkpoint per epoch, metrics every step."""
    fixed = (
        "--batch-size 4 --precision fp32 --num-workers 2 --warmup-epochs 1 --save-every-epochs 1 --keep-last 2 "
        "--log-every 1 --no-progress --no-tensorboard --blr 1e-3"
    ).split()
    return [
        "pretrain",
        "--data",
        str(data),
        "--output",
        str(out),
        "--model",
        model,
        "--epochs",
        str(epochs),
        *fixed,
        *extra,
    ]


def start(args, **env):
    """A `mimkit` process (through inject.py, the real CLI plus optional faults) in its own process group."""
    return subprocess.Popen(
        [sys.executable, INJECT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **env},
        start_new_session=True,
    )


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def cli(args, timeout=240, **env):
    return finish(start(args, **env), timeout)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            steps.append(rec["step"])
    return steps


def wait_for_step(proc, out: Path, step: int, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {finish(proc)}")
        steps = logged_steps(out)  # read once: a resuming run may truncate the file between two reads
        if steps and steps[-1] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def ckpt_steps(out: Path) -> list[int]:
    return sorted(int(p.name[11:20]) for p in out.glob("checkpoint-*.pt"))


def final_weights(out: Path) -> dict:
    path = sorted(out.glob("checkpoint-*.pt"))[-1]
    return torch.load(path, weights_only=True)
