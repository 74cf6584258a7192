"""What the step scripts share (profile_step.py, step_breakdown.py, host_memory_faults.py, cpu_linear.py): a method
with its fused AdamW and random batches, one training step as ``mimkit pretrain`` takes it (zero_grad, forward under
bf16 autocast on CUDA, backward, the update), and settings compared in alternating processes."""

from __future__ import annotations

import torch

import mimkit  # noqa: F401  (before timm: the torchvision shim)
from mimkit.engine.optim import build_optimizer
from mimkit.methods import create_method


def build(model: str, batch_size: int = 8, img_size=None, device: str = "cpu", batches: int = 1):
    """(method in train mode, its optimizer, ``batches`` random batches), seeded."""
    torch.manual_seed(0)
    dev = torch.device(device)
    net = create_method(model, **({"img_size": img_size} if img_size else {})).train().to(dev)
    opt = build_optimizer(net.param_groups(0.05), 1e-4, net.betas, dev)
    side = net.img_size if isinstance(net.img_size, int) else net.img_size[0]
    data = [{"image": torch.randn(batch_size, net.in_chans, side, side, device=dev)} for _ in range(batches)]
    return net, opt, data


def train_step(net, opt, batch: dict, cpu_bf16: bool = False) -> torch.Tensor:
    """zero_grad, forward (bf16 autocast on CUDA, and on the CPU with ``cpu_bf16``), backward, update; returns the
    loss."""
    dev = batch["image"].device
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" or cpu_bf16):
        loss = net(batch)[0]
    loss.backward()
    opt.step()
    return loss


def run_alternating(
    script: str, models: list[str], settings: tuple[str, ...], rounds: int, steps: int, batch_size: int
):
    """Every (model, setting) in its own process (``python script --one MODEL SETTING --steps N --batch-size B``,
    which prints one ``RESULT {json}`` line), the settings alternating in order over ``rounds``; returns the results,
    each with its round, and prints their lines. Exits naming a run that printed no result."""
    import sys

    from _results import print_result, run_for_result

    runs = []
    for rnd in range(rounds):
        for model in models:
            for setting in settings if rnd % 2 == 0 else settings[::-1]:
                cmd = [sys.executable, script, "--one", model, setting, "--steps", str(steps)]
                result, p = run_for_result([*cmd, "--batch-size", str(batch_size)])
                if result is None:
                    sys.exit(f"{model} {setting}: failed\n{p.stderr[-2000:]}")
                runs.append(dict(result, round=rnd))
                print_result(result)
    return runs


def add_alternating_args(ap, steps: int) -> None:
    """The options of a script that compares settings with :func:`run_alternating`: rounds, timed steps, batch size,
    the result file (``--json``), ``--render FILE`` and the hidden ``--one MODEL SETTING`` of a run's own process."""
    import argparse

    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--render", metavar="FILE", help="print the Markdown table of a result file and stop")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)


def answered_here(a, render, one) -> bool:
    """``--render`` (``render(path)``) or ``--one`` (``one(model, setting, batch_size, steps)``, printed as its
    ``RESULT`` line), if ``a`` asks for either: True when done."""
    from _results import print_result

    if a.render:
        render(a.render)
    elif a.one:
        print_result(one(a.one[0], a.one[1], a.batch_size, a.steps))
    return bool(a.render or a.one)


def write_results(path: str | None, results: dict) -> None:
    """``results`` with the date and machine, as JSON at ``path`` (if given): ``bench_table.write_result``, the
    stamp every result file of docs/benchmarks/ starts with."""
    from pathlib import Path

    from bench_table import write_result

    if path:
        write_result(Path(path), results)
