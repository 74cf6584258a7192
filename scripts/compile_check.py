"""Does `--compile` (torch.compile, inductor) give every registered method the eager step's loss and gradients? One
training step of each preset, eager and compiled, each preset in its own process, for docs/design.md.

    .venv/bin/python scripts/compile_check.py --out docs/benchmarks/compile_check.json        # every pico preset
    .venv/bin/python scripts/compile_check.py --models umae_swin_pico_128 simmim_pvt_pico_128
    .venv/bin/python scripts/compile_check.py --render docs/benchmarks/compile_check.json

A batch of 2 random images at the preset's size; the same masks in both modes (the seed is reset before each step
and inductor draws random numbers as eager does, ``fallback_random``). "equal" uses the tolerances of
tests/test_compile.py: the loss within rtol 1e-5 / atol 1e-6, every gradient within rtol 1e-4 / atol 1e-5. The
compilation takes minutes per preset on 2 cores, too long for CI, which checks one compiled model and traces the
method families with a cheap backend (tests/test_compile.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import print_result, run_for_result  # noqa: E402
from bench_table import add_result_args, write_result  # noqa: E402


def small_batch(model) -> dict:
    """2 random images at the method's size, with dataset indices (CoMA's masks read them)."""
    import torch

    side = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    return {"image": torch.randn(2, model.in_chans, side, side), "index": torch.arange(2)}


def one_step(model, fn, batch: dict):
    """(loss, gradients) of one step of ``model`` run through ``fn`` (the model itself or a compiled form of it),
    with the seed reset first so that every form draws the same masks."""
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss, _ = fn(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def check_one(name: str) -> dict:
    """Eager and compiled step of ``name``: the losses, the largest gradient difference, the compile time."""
    import torch
    import torch._inductor.config as inductor_config

    import mimkit  # noqa: F401  (before timm)
    from mimkit.methods import create_method

    torch.manual_seed(0)
    model = create_method(name).train()
    batch = small_batch(model)
    eager_loss, eager_grads = one_step(model, model, batch)
    inductor_config.fallback_random = True
    t0 = time.perf_counter()
    compiled_loss, compiled_grads = one_step(model, torch.compile(model), batch)
    seconds = time.perf_counter() - t0
    grads_equal = len(compiled_grads) == len(eager_grads) and all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(compiled_grads, eager_grads)
    )
    largest = max(float(b.abs().max()) for b in eager_grads)
    diff = max(float((a - b).abs().max()) for a, b in zip(compiled_grads, eager_grads))
    return {
        "model": name,
        "compile_s": round(seconds, 1),
        "loss_eager": float(eager_loss),
        "loss_compiled": float(compiled_loss),
        "grads": len(eager_grads),
        "grad_diff_rel": diff / largest if largest else diff,
        "equal": bool(torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6) and grads_equal),
    }


def render(path: Path) -> str:
    res = json.loads(path.read_text())
    lines = [
        f"{res['date']}, {res['machine']}, at {res['commit']}; one step of batch 2, eager and compiled (inductor):",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "| preset | compile + first step, s | loss eager | loss compiled | largest gradient difference "
        "/ largest gradient | equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        if "error" in r:
            lines.append(f"| `{r['model']}` | - | - | - | {r['error']} | **no** |")
            continue
        lines.append(
            f"| `{r['model']}` | {r['compile_s']:.0f} | {r['loss_eager']:.6f} | {r['loss_compiled']:.6f} | "
            f"{r['grad_diff_rel']:.1e} ({r['grads']} tensors) | {'yes' if r['equal'] else '**no**'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="presets (default: every preset whose name has 'pico')")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: check one preset, print JSON
    add_result_args(ap, rounds=1)
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    if args.one:
        print_result(check_one(args.one))
        return
    import mimkit  # noqa: F401
    from mimkit.methods.registry import list_methods

    models = args.models or [m for m in list_methods() if "pico" in m]
    results = []
    for name in models:
        result, proc = run_for_result([sys.executable, __file__, "--one", name])
        if result is not None:
            results.append(result)
        else:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"model": name, "error": last[:200]})
        print(json.dumps(results[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    models_arg = "" if args.models is None else " --models " + " ".join(args.models)
    command = f".venv/bin/python scripts/compile_check.py{models_arg} --out {args.out}"
    print(write_result(args.out, {"commit": commit, "command": command, "results": results}))


if __name__ == "__main__":
    main()
