"""Build docs/results.md's numbers: equal-wall-clock pretraining on Caltech-101 at 64 px, then linear probe and
fine-tuning of each encoder and of a random-init baseline. CPU-sized; run from the repo root:

    .venv/bin/python scripts/caltech_results.py --data ../shared/data/caltech101 --minutes 5 --out runs/results

Run it on an otherwise idle machine: each method's epoch count is set from a short throughput probe so that its
pretraining fills the same wall-clock budget, and a busy machine makes that probe (and the comparison) unfair.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--minutes", type=float, default=5.0, help="pretraining wall-clock budget per method")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--lp-epochs", type=int, default=30)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_images = len(find_images(args.data))
    rows = []
    for label, preset, blr in MODELS + [("random init (Swin-Pico)", None, None), ("random init (ViT-Nano/8)", None, None)]:
        row = {"label": label, "preset": preset}
        if preset:
            probe = bench_model(preset, 64, args.img_size, steps=3, warmup=1, precision="fp32",
                                device=torch.device("cpu"))
            # data loading and logging cost ~15 % on this machine: schedule the epochs that fit the budget
            epochs = max(1, int(args.minutes * 60 * probe["images_per_s"] * 0.85 / n_images))
            cfg = PretrainConfig(data=args.data, model=preset, img_size=args.img_size, epochs=epochs, batch_size=64,
                                 blr=blr, warmup_epochs=max(1, epochs // 10), precision="fp32", seed=0,
                                 output=str(out / preset), resume="none", progress=False,
                                 time_limit_min=args.minutes * 1.15, save_every_epochs=max(1, epochs))
            t0 = time.time()
            summary = pretrain(cfg)
            row.update(pretrain_epochs=summary["epochs_done"], pretrain_steps=summary["steps"],
                       pretrain_s=round(time.time() - t0, 1), final_loss=summary["final_loss"],
                       probe_images_per_s=probe["images_per_s"])
            model, saved = load_pretrained(out / preset)
            source = dict(pretrained=str(out / preset))
            mean, std = saved.mean, saved.std
        else:
            base = "umae_swin_pico_128" if "Swin" in label else "mae_vit_nano_patch8"
            model = random_init(base, img_size=args.img_size, seed=0)
            source = dict(random_init=base)
            mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        lp = linear_probe(model, args.data, args.img_size, mean, std, epochs=args.lp_epochs, batch_size=256,
                          warmup_epochs=3)
        row.update(linprobe_top1=lp["top1"], linprobe_best=lp["best_top1"])
        ft = finetune(FinetuneConfig(data=args.data, output=str(out / f"ft_{preset or label.split()[-1][1:-1]}"),
                                     epochs=args.ft_epochs, img_size=args.img_size, batch_size=64, warmup_epochs=1,
                                     precision="fp32", seed=0, resume="none", progress=False, **source))
        row.update(finetune_top1=ft["val_top1"], finetune_best=ft["best_val_top1"], finetune_s=ft["wall_time_s"])
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
