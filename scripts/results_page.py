"""docs/results.md's table and its two PNGs (accuracy bars, pretraining loss curves) from the result file that
scripts/caltech_results.py writes, and nothing else:

    .venv/bin/python scripts/results_page.py docs/results/caltech101.json              # the table (a generated block)
    .venv/bin/python scripts/results_page.py docs/results/caltech101.json --figures docs   # the two PNGs
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


def curves(rows, path: Path):
    w, h, left, bottom, top = 860, 380, 50, 40, 30
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    series = []
    for r in rows:
        if not r.get("preset"):
            continue
        first = r["loss_curve"][0][1]
        series.append((r["label"], [(t, loss / first) for t, loss in r["loss_curve"]]))
    tmax = max(p[-1][0] for _, p in series)
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for k, (label, pts) in enumerate(series):
        xy = [(left + (w - left - 20) * t / tmax, h - bottom - (h - bottom - top) * min(v, 1.2) / 1.2) for t, v in pts]
        d.line(xy, fill=COLORS[k], width=2)
        d.text((w - 230, 8 + 14 * k), label, fill=COLORS[k])
    d.text((left, h - bottom + 8), f"0 ... {tmax:.1f} min of pretraining (wall clock)", fill="black")
    d.text((4, 8), "loss / first logged loss", fill="black")
    im.save(path)


def table(res: dict) -> str:
    """The Markdown table of the result file, with its date, machine and command."""
    rows = res["rows"]
    lines = [
        f"{res['date']}, {res['machine']}; {res['minutes']:g} minutes of pretraining per method at "
        f"{res['img_size']} px, seed 0, one run per row:",
        "",
        "```bash",
        f".venv/bin/python {res['command']}",
        "```",
        "",
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
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, help="the result file of scripts/caltech_results.py")
    ap.add_argument("--figures", type=Path, help="write results_accuracy.png and results_loss.png into this folder")
    args = ap.parse_args()
    res = json.loads(args.file.read_text())
    if args.figures:
        bars(res["rows"], args.figures / "results_accuracy.png")
        curves(res["rows"], args.figures / "results_loss.png")
    else:
        print(table(res))


if __name__ == "__main__":
    main()
