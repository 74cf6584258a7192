"""Build docs/results.md's numbers: equal-wall-clock pretraining on Caltech-101 at 64 px, then linear probe and
fine-tuning of each encoder and of random-init baselines. CPU-sized; run from the repo root:

    .venv/bin/python scripts/caltech_results.py --data ../shared/data/caltech101 --minutes 3 --out runs/results \
        --json docs/results/caltech101.json

The result file (``--json``) keeps, per row, the numbers of the table and the pretraining loss curve (at most 120
points), with the date, machine and command; ``scripts/results_page.py`` makes docs/results.md's table and figures
from it alone.

Equal wall-clock, robustly: every method's training throughput is probed first, back to back (run the probes on an
otherwise idle machine), and each method then trains for the number of epochs that fills the budget at its probed
speed. The epoch counts are fixed before any training starts, so later load on the machine slows the runs down but
does not change what each method gets. `--only` runs a subset (e.g. a new method) and merges its rows into an existing
results.json.

Fine-tuning uses a short-schedule recipe for every row alike (a few epochs, so no mixup / cutmix / random erasing,
blr 2e-3); it is a comparison at a tiny budget, not the papers' 100-epoch protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mimkit  # noqa: F401
from mimkit.bench import bench_model
from mimkit.config import PretrainConfig
from mimkit.data import find_images
from mimkit.eval import linear_probe
from mimkit.eval.finetune import FinetuneConfig, finetune
from mimkit.loading import load_pretrained, random_init
from mimkit.pretraining import pretrain

MODELS = [  # (label, preset, base lr, model args); 64 px everywhere
    ("MAE ViT-Nano/8", "mae_vit_nano_patch8", 1e-3, {}),
    ("UM-MAE Swin-Pico", "umae_swin_pico_128", 1e-3, {}),
    ("UM-MAE PVT-Pico", "umae_pvt_pico_128", 1e-3, {}),
    ("SimMIM Swin-Pico", "simmim_swin_pico_128", 2e-3, {}),  # per 512: the same absolute lr
    ("LoMaR ViT-Nano/8", "lomar_vit_nano_patch8", 1e-3, {}),
    ("MixMAE Swin-Pico", "mixmae_swin_pico_128", 1e-3, {}),
    ("CoMA DyViT-Pico", "coma_dyvit_pico_128", 1e-3, {}),
]
BASELINES = [("random init (Swin-Pico)", "umae_swin_pico_128"), ("random init (ViT-Nano/8)", "mae_vit_nano_patch8")]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def plan_epochs(runs, data: str, img_size: int, minutes: float, batch_size: int = 64) -> dict:
    """{key: (epochs, probed images/s)} for [(key, preset, model args)], probed back to back."""
    n_images = len(find_images(data))
    plan = {}
    for key, preset, args in runs:
        probe = bench_model(
            preset, batch_size, img_size, steps=4, warmup=2, precision="fp32", device=torch.device("cpu"), **args
        )
        # data loading and logging cost ~15 % on this machine: schedule the epochs that fit the budget
        plan[key] = (max(1, round(minutes * 60 * probe["images_per_s"] * 0.85 / n_images)), probe["images_per_s"])
        print(f"probe {key}: {probe['images_per_s']:.1f} img/s -> {plan[key][0]} epochs", flush=True)
    return plan


def pretrain_run(preset: str, args: dict, data: str, img_size: int, epochs: int, blr: float, output: Path) -> dict:
    cfg = PretrainConfig(
        data=data,
        model=preset,
        img_size=img_size,
        epochs=epochs,
        batch_size=64,
        blr=blr,
        warmup_epochs=max(1, epochs // 10),
        precision="fp32",
        seed=0,
        output=str(output),
        resume="none",
        overwrite=True,
        progress=False,
        save_every_epochs=max(1, epochs),
        model_args=args,
    )
    t0 = time.time()
    summary = pretrain(cfg)
    return dict(
        pretrain_epochs=summary["epochs_done"],
        pretrain_steps=summary["steps"],
        pretrain_s=round(time.time() - t0, 1),
        final_loss=summary["final_loss"],
    )


def loss_curve(metrics: Path, points: int = 120) -> list[list[float]]:
    """[[minutes since the first logged step, loss], ...] from a run's metrics.jsonl, thinned to ``points``."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    recs = [x for x in recs if "loss" in x and "time" in x]
    t0 = recs[0]["time"]
    keep = recs[:: max(1, len(recs) // points)]
    if keep[-1] is not recs[-1]:
        keep.append(recs[-1])
    return [[round((x["time"] - t0) / 60, 4), round(x["loss"], 5)] for x in keep]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/results", help="run folders")
    ap.add_argument("--json", default="docs/results/caltech101.json", help="the result file")
    ap.add_argument("--minutes", type=float, default=3.0, help="pretraining wall-clock budget per method")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--lp-epochs", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=None, help="labels or presets to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = MODELS + [(label, None, base, {}) for label, base in BASELINES]
    if args.only:
        todo = [t for t in todo if t[0] in args.only or (t[1] or "") in args.only]
    results = Path(args.json)
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_table import write_result

    head = {
        "command": "scripts/caltech_results.py " + " ".join(sys.argv[1:]),
        "minutes": args.minutes,
        "img_size": args.img_size,
    }
    plan = plan_epochs([(p, p, a) for _, p, _, a in todo if p], args.data, args.img_size, args.minutes)
    for label, preset, blr, model_args in todo:
        row = {"label": label, "preset": preset}
        if preset:
            epochs, ips = plan[preset]
            row.update(
                pretrain_run(preset, model_args, args.data, args.img_size, epochs, blr, out / preset),
                probe_images_per_s=ips,
                loss_curve=loss_curve(out / preset / "metrics.jsonl"),
            )
            model, saved = load_pretrained(out / preset)
            source = dict(pretrained=str(out / preset))
            mean, std = saved.mean, saved.std
        else:
            model = random_init(blr, img_size=args.img_size, seed=0)
            source = dict(random_init=blr)
            mean, std = MEAN, STD
        lp = linear_probe(
            model, args.data, args.img_size, mean, std, epochs=args.lp_epochs, batch_size=256, warmup_epochs=3
        )
        row.update(linprobe_top1=lp["top1"], linprobe_best=lp["best_top1"])
        ft = finetune(
            FinetuneConfig(
                data=args.data,
                output=str(out / f"ft_{preset or 'random_' + blr}"),
                epochs=args.ft_epochs,
                img_size=args.img_size,
                batch_size=64,
                warmup_epochs=1,
                blr=2e-3,
                mixup=0.0,
                cutmix=0.0,
                reprob=0.0,
                precision="fp32",
                seed=0,
                resume="none",
                overwrite=True,
                progress=False,
                **source,
            )
        )
        row.update(finetune_top1=ft["val_top1"], finetune_best=ft["best_val_top1"], finetune_s=ft["wall_time_s"])
        rows = [r for r in rows if r["label"] != label] + [row]
        write_result(results, {**head, "rows": rows})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
