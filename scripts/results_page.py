"""Write docs/results.md and its two PNGs (accuracy bars, pretraining loss curves) from caltech_results.py's output.

.venv/bin/python scripts/results_page.py --runs runs/results --docs docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def bars(rows, path: Path):
    w, h, left, bottom, top = max(760, 120 * len(rows) + 80), 380, 50, 100, 30
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    ymax = min(100.0, (int(max(max(r["linprobe_top1"], r["finetune_top1"]) for r in rows) / 10) + 1) * 10)
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for t in range(0, int(ymax) + 1, 10):
        y = h - bottom - (h - bottom - top) * t / ymax
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((left - 30, y - 6), f"{t}", fill="black")
    slot = (w - left - 20) / len(rows)
    for i, r in enumerate(rows):
        for j, key in enumerate(("linprobe_top1", "finetune_top1")):
            x0 = left + 10 + i * slot + j * slot * 0.42
            y = h - bottom - (h - bottom - top) * r[key] / ymax
            d.rectangle([x0, y, x0 + slot * 0.38, h - bottom], fill=COLORS[j])
            d.text((x0, y - 12), f"{r[key]:.1f}", fill="black")
        label = r["label"].replace(" (", "\n(")
        d.multiline_text((left + 10 + i * slot, h - bottom + 6), label, fill="black")
    d.rectangle([w - 250, 8, w - 238, 20], fill=COLORS[0])
    d.text((w - 232, 8), "linear probe top-1 (%)", fill="black")
    d.rectangle([w - 250, 24, w - 238, 36], fill=COLORS[1])
    d.text((w - 232, 24), "fine-tune top-1 (%)", fill="black")
    im.save(path)


def curves(runs: Path, rows, path: Path):
    w, h, left, bottom, top = 860, 380, 50, 40, 30
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    series = []
    for r in rows:
        if not r.get("preset"):
            continue
        recs = [json.loads(x) for x in (runs / r["preset"] / "metrics.jsonl").read_text().splitlines()]
        recs = [x for x in recs if "loss" in x]
        t0 = recs[0]["time"]
        first = recs[0]["loss"]
        series.append((r["label"], [((x["time"] - t0) / 60, x["loss"] / first) for x in recs]))
    tmax = max(p[-1][0] for _, p in series)
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for k, (label, pts) in enumerate(series):
        xy = [(left + (w - left - 20) * t / tmax, h - bottom - (h - bottom - top) * min(v, 1.2) / 1.2) for t, v in pts]
        d.line(xy, fill=COLORS[k], width=2)
        d.text((w - 230, 8 + 14 * k), label, fill=COLORS[k])
    d.text((left, h - bottom + 8), f"0 ... {tmax:.1f} min of pretraining (wall clock)", fill="black")
    d.text((4, 8), "loss / first logged loss", fill="black")
    im.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args()
    runs, docs = Path(args.runs), Path(args.docs)
    rows = json.loads((runs / "results.json").read_text())
    bars(rows, docs / "results_accuracy.png")
    curves(runs, rows, docs / "results_loss.png")
    lines = [
        "| encoder | probed img/s | epochs (steps) | pretraining | final loss | linear probe top-1 | "
        "fine-tune top-1 (best epoch) | fine-tuning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pre = f"{r['pretrain_s'] / 60:.1f} min" if r.get("preset") else "none"
        ips = f"{r['probe_images_per_s']:.0f}" if r.get("preset") else "-"
        ep = f"{r['pretrain_epochs']} ({r['pretrain_steps']})" if r.get("preset") else "-"
        loss = f"{r['final_loss']:.3f}" if r.get("preset") else "-"
        lines.append(
            f"| {r['label']} | {ips} | {ep} | {pre} | {loss} | {r['linprobe_top1']:.2f} % | "
            f"{r['finetune_top1']:.2f} % ({r['finetune_best']:.2f} %) | {r['finetune_s'] / 60:.1f} min |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
