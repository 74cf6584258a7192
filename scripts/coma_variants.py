"""Choose CoMA's default among its mask modes and teacher variants: equal-wall-clock pretraining of DyViT-Pico on
Caltech-101, then kNN top-1 on val (and the last logged losses). Run from the repo root on an idle machine:

    .venv/bin/python scripts/coma_variants.py --data ../shared/data/caltech101 --minutes 3 --out runs/coma_variants

Epoch counts come from throughput probes taken back to back before any training (see caltech_results.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caltech_results import plan_epochs, pretrain_run

import mimkit  # noqa: F401
from mimkit.eval.knn import knn_evaluate
from mimkit.loading import load_pretrained

VARIANTS = [  # (label, model args)
    ("random masking (control)", {"mode": "random"}),
    ("pair, no teacher", {"mode": "pair"}),
    ("cycle, no teacher", {"mode": "cycle"}),
    ("cycle, EMA teacher, consistency 0.5", {"mode": "cycle", "teacher": "ema", "teacher_weight": 0.5}),
    ("pair, EMA teacher, consistency 0.5", {"mode": "pair", "teacher": "ema", "teacher_weight": 0.5}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/coma_variants")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--preset", default="coma_dyvit_pico_128")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_epochs([(label, args.preset, a) for label, a in VARIANTS], args.data, args.img_size, args.minutes)
    rows = []
    for i, (label, model_args) in enumerate(VARIANTS):
        epochs, ips = plan[label]
        run = out / f"v{i}"
        row = {
            "label": label,
            "model_args": model_args,
            "probe_images_per_s": ips,
            **pretrain_run(args.preset, model_args, args.data, args.img_size, epochs, 1e-3, run),
        }
        model, saved = load_pretrained(run)
        knn = knn_evaluate(model, args.data, saved.img_size, saved.mean, saved.std)
        row.update(knn_top1=knn["top1"], knn_top5=knn["top5"])
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        teacher = [r["teacher_loss"] for r in recs if "teacher_loss" in r]
        row["last_teacher_loss"] = teacher[-1] if teacher else None
        rows.append(row)
        (out / "variants.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
