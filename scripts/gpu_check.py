"""Every GPU check and GPU benchmark in one command, for a short loan of a GPU machine (docs/benchmarks.md, "GPU").

Phases, in order of priority, each on its own so that one failure does not lose the others; each writes one JSON
line per result to ``--out`` as soon as it has it, and no phase starts after ``--budget-s`` seconds:

1. ``env``: torch, CUDA device, and the measured bf16 matrix-product rate (the ceiling used for MFU).
2. ``smoke``: every registered pico/nano model's training step (the bench's step = the trainer's) on CUDA in bf16.
3. ``cli``: the real CLI on the bundled sample images on CUDA in bf16: pretrain, resume, kNN; then torchrun with
   ``--strategy fsdp`` (NCCL, sharded checkpoints), its resume, and ``mimkit export`` of the sharded folder.
4. ``memory``: peak CUDA memory of MAE ViT-L/16 and UM-MAE Swin-L at the papers' 64 images per GPU, bf16, with and
   without activation checkpointing.
5. ``table3``: UM-MAE vs SimMIM, Swin-T and PVT-S at 256 px, the UM-MAE paper's 128 images per GPU, bf16,
   3 alternating rounds (speed ratio median and range, memory ratio).
6. ``mfu``: MAE ViT-B/16 and UM-MAE Swin-B images per second, bf16, with model FLOPs utilisation (3 x forward
   FLOPs x images/s over the measured and the datasheet bf16 rate).
7. ``side_by_side``: ``scripts/side_by_side_gpu.py`` (mimkit vs the released UM-MAE code and transformers' ViTMAE),
   when ``--tool`` and ``--ref-dir`` are given; it starts no row after the budget.
8. ``mfu_compiled``: ``mfu`` with ``torch.compile``, where at least two minutes of the budget are left.

    python scripts/gpu_check.py --out gpu.jsonl [--tool side_by_side.py --ref-dir REF] [--budget-s 480]

``--quick`` runs every phase with pico models and tiny batches (a dry run of the script itself, also on CPU).
``--render FILE`` prints the Markdown tables of a results file (docs/benchmarks.md's GPU section is generated so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _results import PREFIX, results_in

ROOT = Path(__file__).resolve().parents[1]
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


class Log:
    """JSON lines to a file and a short line on stdout."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()

    def __call__(self, phase: str, **row) -> None:
        row = {"phase": phase, "t_s": round(time.time() - self.start, 1), **row}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def phase_env(log, a):
    import timm
    import torch

    row = {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        row["device"] = torch.cuda.get_device_name()
        n = 2048 if a.quick else 8192
        x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            x @ x
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            x @ x
        torch.cuda.synchronize()
        row["bf16_matmul_tflops"] = round(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12, 1)
    log("env", **row)
    return row


def bench_one(name, batch, device, steps, warmup, precision="bf16", compile=False, img_size=None):
    import torch

    from mimkit.bench import bench_model

    return bench_model(name, batch, img_size, steps, warmup, precision, torch.device(device), compile)


def phase_smoke(log, a, dev):
    from mimkit.methods import list_methods

    names = [n for n in list_methods() if "pico" in n or "nano" in n]
    for name in names:
        try:
            r = bench_one(name, 4 if a.quick else 8, dev, 2, 1)
            ok = r["loss"] == r["loss"] and abs(r["loss"]) < 1e4
            log("smoke", model=name, ok=ok, loss=round(r["loss"], 4), ms=round(r["step_time_s"] * 1e3, 1))
        except Exception as e:  # one model's failure must not hide the others'
            log("smoke", model=name, ok=False, error=f"{type(e).__name__}: {e}"[:500])


def run_cli(log, label, args, env=None, timeout=240):
    t0 = time.time()
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    log(
        "cli",
        step=label,
        rc=p.returncode,
        s=round(time.time() - t0, 1),
        tail=(p.stdout[-600:] + p.stderr[-1200:]) if p.returncode else p.stdout[-300:],
    )
    return p.returncode


def phase_cli(log, a):
    py = sys.executable
    mk = [py, "-m", "mimkit.cli"]
    data = str(ROOT / "examples" / "sample_images")
    tmp = Path(tempfile.mkdtemp(prefix="mimkit-gpu-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    common = ["--recipe", str(ROOT / "recipes" / "demo_cpu.yaml"), "--data", data, "--precision", "bf16"]
    common += ["--save-every-epochs", "1", "--num-workers", "2", "--log-every", "5"]
    run = tmp / "run"
    if run_cli(log, "pretrain 2 epochs", mk + ["pretrain", *common, "--epochs", "2", "--output", str(run)], env) == 0:
        run_cli(log, "resume to 4 epochs", mk + ["pretrain", *common, "--epochs", "4", "--output", str(run)], env)
        run_cli(log, "knn", mk + ["knn", str(run), "--data", data, "--json"], env)
    tr = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "mimkit.cli"]
    fs = tmp / "fsdp"
    fsdp = ["--strategy", "fsdp", "--checkpoint-format", "sharded", "--output", str(fs)]
    if run_cli(log, "torchrun fsdp sharded 2 epochs", tr + ["pretrain", *common, *fsdp, "--epochs", "2"], env) == 0:
        run_cli(log, "torchrun fsdp resume to 3", tr + ["pretrain", *common, *fsdp, "--epochs", "3"], env)
        run_cli(log, "export sharded", mk + ["export", str(fs), "--out", str(tmp / "enc.safetensors")], env)


def phase_memory(log, a, dev):
    specs = [("mae_vit_large_patch16", 64), ("umae_swin_large_256", 64)]
    if a.quick:
        specs = [("mae_vit_pico_patch8", 4), ("umae_swin_pico_128", 4)]
    for name, batch in specs:
        for ckpt in (False, True):
            spec = name + (":grad_checkpointing=true" if ckpt else "")
            try:
                r = bench_one(spec, batch, dev, 3 if not a.quick else 1, 1)
                log("memory", **r)
            except Exception as e:
                log("memory", model=spec, error=f"{type(e).__name__}: {e}"[:500])


def phase_table3(log, a, dev):
    from mimkit.bench import bench

    pairs = [["simmim_swin_tiny_256", "umae_swin_tiny_256"], ["simmim_pvt_small_256", "umae_pvt_small_256"]]
    batch, steps = 128, 10
    if a.quick:
        pairs, batch, steps = [["simmim_swin_pico_128", "umae_swin_pico_128"]], 4, 1
    for models in pairs:
        try:
            for r in bench(models, batch, [None], steps, 3 if not a.quick else 1, "bf16", dev, rounds=3):
                log("table3", **r)
        except Exception as e:
            log("table3", models=models, error=f"{type(e).__name__}: {e}"[:500])


def phase_side_by_side(log, a, deadline):
    cmd = [sys.executable, str(ROOT / "scripts" / "side_by_side_gpu.py"), "--tool", a.tool, "--ref-dir", a.ref_dir]
    cmd += ["--rounds", "3", "--deadline", str(deadline)]
    if a.quick:
        cmd += ["--rows", "hf_mae_vit_b,mk_mae_vit_b", "--rounds", "1", "--steps", "1", "--warmup", "0", "--batch", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith(PREFIX):
            log("side_by_side", **results_in([line])[0])
        elif line.strip():
            log("side_by_side", note=line[:1500])
    if p.returncode:
        log("side_by_side", rc=p.returncode, stderr=p.stderr[-1500:])


def phase_mfu(log, a, dev, env_row, deadline, compile):
    peak_measured = env_row.get("bf16_matmul_tflops")
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in env_row.get("device", "")), None)
    specs = [("mae_vit_base_patch16", 256), ("umae_swin_base_256", 128)]
    if a.quick:
        specs = [("mae_vit_pico_patch8", 4)]
    for name, batch in specs:
        if compile and time.time() > deadline - 120:  # a compilation takes one to two minutes
            log("mfu", model=name, compile=compile, skipped="not enough time left")
            continue
        try:
            r = bench_one(name, batch, dev, 10 if not a.quick else 1, 3 if not a.quick else 1, compile=compile)
            tflops = 3 * (r["encoder_gflops"] + r["decoder_gflops"]) * r["images_per_s"] / 1e3
            r["compile"] = compile
            r["model_tflops"] = round(tflops, 1)
            if peak_measured:
                r["mfu_vs_measured"] = round(tflops / peak_measured, 3)
            if sheet:
                r["mfu_vs_datasheet"] = round(tflops / sheet, 3)
            log("mfu", **r)
        except Exception as e:
            log("mfu", model=name, compile=compile, error=f"{type(e).__name__}: {e}"[:500])


def _table(header: list[str], cells: list[list[str]]) -> list[str]:
    """A Markdown table (preceded by a blank line) as lines; nothing for no rows."""
    if not cells:
        return []
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


def render(path: Path) -> str:
    """Markdown tables of a results file: the checks, memory with and without checkpointing, UM-MAE vs SimMIM, MFU."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    env = next(r for r in rows if r["phase"] == "env" and "torch" in r)
    out = [
        f"{env.get('device', 'CPU')}, torch {env['torch']}, timm {env['timm']}, Python {env['python']}; "
        f"bf16 matrix product measured at {env.get('bf16_matmul_tflops', '-')} TFLOP/s (8192^3, mean of 10).",
    ]
    smoke = [r for r in rows if r["phase"] == "smoke" and "model" in r]
    ok = [r["model"] for r in smoke if r.get("ok")]
    if smoke:
        out.append("")
        out.append(f"**Checks.** Training step on the GPU in bf16 (finite loss): {len(ok)} of {len(smoke)} models.")
    out += [f"- FAILED {r['model']}: {r.get('error', r.get('loss'))}" for r in smoke if not r.get("ok")]
    for r in (r for r in rows if r["phase"] == "cli" and "step" in r):
        out.append(f"- `{r['step']}`: {'ok' if r['rc'] == 0 else 'FAILED, exit ' + str(r['rc'])} ({r['s']:.0f} s)")
    yes = {True: "yes", False: "no"}
    out += _table(
        ["model", "batch", "activation checkpointing", "peak GPU memory", "ms/step", "images/s"],
        [
            [r["model"].split(":")[0], str(r["batch_size"]), yes[r["grad_checkpointing"]],
             f"{r['peak_memory_mb']:,.0f} MB", f"{r['step_time_s'] * 1e3:.0f}", f"{r['images_per_s']:,.0f}"]
            for r in rows if r["phase"] == "memory" and "peak_memory_mb" in r
        ],
    )  # fmt: skip
    out += _table(
        ["model", "batch", "ms/step", "peak GPU memory", "speed vs SimMIM, median (range)", "memory vs SimMIM"],
        [
            [r["model"], str(r["batch_size"]), f"{r['step_time_s'] * 1e3:.0f}", f"{r['peak_memory_mb']:,.0f} MB",
             "{:.2f}x ({:.2f}-{:.2f})".format(r["speed_vs_first"], *r["speed_vs_first_range"]),
             f"{r['memory_vs_first']:.2f}x"]
            for r in rows if r["phase"] == "table3" and "peak_memory_mb" in r
        ],
    )  # fmt: skip
    out += _table(
        ["model", "batch", "compiled", "images/s", "model TFLOP/s", "MFU vs measured", "MFU vs datasheet"],
        [
            [r["model"], str(r["batch_size"]), yes[r["compile"]], f"{r['images_per_s']:,.0f}",
             f"{r['model_tflops']:.0f}", f"{r.get('mfu_vs_measured', 0):.1%}", f"{r.get('mfu_vs_datasheet', 0):.1%}"]
            for r in rows if r["phase"] in ("mfu", "mfu_compiled") and "images_per_s" in r
        ],
    )  # fmt: skip
    skipped = [f"{r['phase']} {r.get('model', '')}".strip() for r in rows if "skipped" in r]
    if skipped:
        out += ["", "Not run (device time): " + ", ".join(skipped) + "."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, help="print the Markdown tables of a results file and exit")
    ap.add_argument("--out", help="JSON-lines file for the results")
    ap.add_argument("--tool", help="path of ../shared/tools/side_by_side.py (side-by-side phase)")
    ap.add_argument("--ref-dir", help="folder of the released UM-MAE code (side-by-side phase)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no phase starts after this many seconds")
    ap.add_argument("--phases", default="env,smoke,cli,memory,table3,mfu,side_by_side,mfu_compiled")
    ap.add_argument("--quick", action="store_true", help="pico models and tiny batches: a dry run of this script")
    a = ap.parse_args()
    if a.render:
        return print(render(a.render))
    if not a.out:
        ap.error("--out is required (or --render FILE)")
    sys.path.insert(0, str(ROOT))
    import torch

    import mimkit  # noqa: F401

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    log = Log(Path(a.out))
    deadline = time.time() + a.budget_s
    env_row: dict = {}
    for phase in a.phases.split(","):
        if time.time() > deadline:
            log(phase, skipped="budget spent")
            continue
        t0 = time.time()
        try:
            if phase == "env":
                env_row = phase_env(log, a)
            elif phase == "smoke":
                phase_smoke(log, a, dev)
            elif phase == "cli":
                phase_cli(log, a)
            elif phase == "memory":
                phase_memory(log, a, dev)
            elif phase == "table3":
                phase_table3(log, a, dev)
            elif phase == "side_by_side" and a.tool and a.ref_dir:
                phase_side_by_side(log, a, deadline)
            elif phase in ("mfu", "mfu_compiled"):
                phase_mfu(log, a, dev, env_row, deadline, compile=phase == "mfu_compiled")
        except Exception:
            log(phase, error=traceback.format_exc()[-1500:])
        log(phase, done_s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
