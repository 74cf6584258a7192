"""Build docs/results.md's numbers: equal-wall-clock pretraining on Caltech-101 at 64 px, then linear probe and
fine-tuning of each encoder and of a random-init baseline. CPU-sized; run from the repo root:

    .venv/bin/python scripts/caltech_results.py --data ../shared/data/caltech101 --minutes 5 --out runs/results

Equal wall-clock, robustly: every method's training throughput is probed first, back to back (run the probes on an
otherwise idle machine), and each method then trains for the number of epochs that fills the budget at its probed
speed. The epoch counts are fixed before any training starts, so later load on the machine slows the runs down but
does not change what each method gets. `--only` runs a subset (e.g. a new method) and merges its rows into an existing
results.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mimkit  # noqa: F401
from mimkit.bench import bench_model
from mimkit.config import PretrainConfig
from mimkit.data import find_images
from mimkit.engine.trainer import pretrain
from mimkit.eval import linear_probe
from mimkit.eval.finetune import FinetuneConfig, finetune
from mimkit.loading import load_pretrained, random_init

import torch

MODELS = [  # (label, preset, base lr); 64 px everywhere
    ("MAE ViT-Nano/8", "mae_vit_nano_patch8", 1e-3),
    ("UM-MAE Swin-Pico", "umae_swin_pico_128", 1e-3),
    ("UM-MAE PVT-Pico", "umae_pvt_pico_128", 1e-3),
    ("SimMIM Swin-Pico", "simmim_swin_pico_128", 2e-3),  # per 512: the same absolute lr
]
BASELINES = [("random init (Swin-Pico)", "umae_swin_pico_128"), ("random init (ViT-Nano/8)", "mae_vit_nano_patch8")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--minutes", type=float, default=5.0, help="pretraining wall-clock budget per method")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--lp-epochs", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=None, help="labels or presets to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_images = len(find_images(args.data))
    todo = [(label, preset, blr) for label, preset, blr in MODELS] + [(label, None, base) for label, base in BASELINES]
    if args.only:
        todo = [t for t in todo if t[0] in args.only or (t[1] or "") in args.only]
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    epochs_for = {}
    for label, preset, _ in todo:  # all probes first, back to back, before any training loads the machine
        if preset:
            probe = bench_model(preset, 64, args.img_size, steps=4, warmup=2, precision="fp32",
                                device=torch.device("cpu"))
            # data loading and logging cost ~15 % on this machine: schedule the epochs that fit the budget
            epochs_for[preset] = (max(1, round(args.minutes * 60 * probe["images_per_s"] * 0.85 / n_images)),
                                  probe["images_per_s"])
            print(f"probe {preset}: {probe['images_per_s']:.1f} img/s -> {epochs_for[preset][0]} epochs", flush=True)
    for label, preset, blr in todo:
        row = {"label": label, "preset": preset}
        if preset:
            epochs, ips = epochs_for[preset]
            cfg = PretrainConfig(data=args.data, model=preset, img_size=args.img_size, epochs=epochs, batch_size=64,
                                 blr=blr, warmup_epochs=max(1, epochs // 10), precision="fp32", seed=0,
                                 output=str(out / preset), resume="none", progress=False,
                                 save_every_epochs=max(1, epochs))
            t0 = time.time()
            summary = pretrain(cfg)
            row.update(pretrain_epochs=summary["epochs_done"], pretrain_steps=summary["steps"],
                       pretrain_s=round(time.time() - t0, 1), final_loss=summary["final_loss"],
                       probe_images_per_s=ips)
            model, saved = load_pretrained(out / preset)
            source = dict(pretrained=str(out / preset))
            mean, std = saved.mean, saved.std
        else:
            base = blr
            model = random_init(base, img_size=args.img_size, seed=0)
            source = dict(random_init=base)
            mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        lp = linear_probe(model, args.data, args.img_size, mean, std, epochs=args.lp_epochs, batch_size=256,
                          warmup_epochs=3)
        row.update(linprobe_top1=lp["top1"], linprobe_best=lp["best_top1"])
        ft = finetune(FinetuneConfig(data=args.data, output=str(out / f"ft_{preset or 'random_' + blr}"),
                                     epochs=args.ft_epochs, img_size=args.img_size, batch_size=64, warmup_epochs=1,
                                     precision="fp32", seed=0, resume="none", progress=False, **source))
        row.update(finetune_top1=ft["val_top1"], finetune_best=ft["best_val_top1"], finetune_s=ft["wall_time_s"])
        rows = [r for r in rows if r["label"] != label] + [row]
        results.write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
