"""The shared side-by-side tool's rows on a GPU: the same models, builders and optimizers as
``../shared/tools/side_by_side.py`` (loaded from ``--tool``), each row in its own process, rows alternating over
rounds, but the model and batches on CUDA, the forward under bf16 autocast for every row alike (``--precision``),
a larger batch (``--batch``), and the GPU synchronised around each timed step. Memory is the peak of CUDA
allocations above the model's weights (gradients, optimizer state, activations).

Prints the tool's ``RESULT`` lines, so ``scripts/reference_ratios.py`` reads the output:

    python scripts/side_by_side_gpu.py --tool side_by_side.py --ref-dir REF --batch 64 --rounds 3 > gpu.log
    python scripts/reference_ratios.py gpu.log --markdown
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

from _results import print_result
from side_by_side_compiled import add_tool_args, load_tool, run_rounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mimkit from this checkout, installed or not

ROWS = (
    "ref_umae_swin_t,mk_umae_swin_t,ref_simmim_swin_t,mk_simmim_swin_t,ref_umae_pvt_s,mk_umae_pvt_s,"
    "ref_simmim_pvt_s,mk_simmim_pvt_s,hf_mae_vit_b,mk_mae_vit_b"
)


def to_device(x, device):
    """Tensors (also inside tuples, lists and dicts) moved to ``device``."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def run_one(tool, row: str, ref_dir: str, warmup: int, steps: int, batch: int, precision: str, compile: bool) -> None:
    import torch

    import mimkit  # noqa: F401  (as the tool does)

    kind, model, default_batch, px = tool.ROWS[row]
    size = batch or default_batch
    torch.manual_seed(0)
    if kind == "ref":
        try:
            import turtle  # noqa: F401
        except ImportError:  # the released models_mae_swin.py imports turtle.pos and never uses it; no tkinter here
            sys.modules["turtle"] = types.SimpleNamespace(pos=None)  # type: ignore[assignment]
        net, opt, make_batch, step = tool.build_ref(model, ref_dir, size, px)
    elif kind == "mk":
        net, opt, make_batch, step = tool.build_mk(model, size, px)
    else:
        net, opt, make_batch, step = tool.build_hf(model, size, px)
    cuda = torch.cuda.is_available()  # a CPU run only checks this script (no timing worth reading)
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    net.to(device).train()  # parameters keep their identity, so the optimizer built above still holds them
    run = step
    if compile:
        compiled = torch.compile(net)
        run = {"mk": lambda b: compiled(b)[0], "ref": lambda b: compiled(b[0], mask=b[1])[0]}.get(kind, step)
    batches = [to_device(make_batch(), device) for _ in range(warmup + steps)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for i, b in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = run(b)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {
        "row": row + ("_compiled" if compile else ""),
        "kind": kind,
        "model": model,
        "batch": size,
        "px": px,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "loss": float(loss),
        "times": [round(t, 5) for t in times],
        "peak_growth_MB": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if cuda else 0.0,
    }
    print_result(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tool_args(ap, warmup=3, steps=10)
    ap.add_argument("--rows", default=ROWS, help="comma-separated rows of the tool")
    ap.add_argument("--batch", type=int, default=64, help="images per step for every row (0: the tool's own)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the mimkit and reference models")
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time after which no further row starts")
    a = ap.parse_args()
    tool = load_tool(a.tool)
    if a.one:
        return run_one(tool, a.one, a.ref_dir, a.warmup, a.steps, a.batch, a.precision, a.compile)
    extra = ["--batch", str(a.batch), "--precision", a.precision] + (["--compile"] if a.compile else [])
    run_rounds(__file__, a, a.rows.split(","), extra, a.deadline)


if __name__ == "__main__":
    main()
