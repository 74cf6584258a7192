"""``mimkit compare``: several models or variants pretrained on one dataset with the same budget (epochs, or epochs cut
at the same wall-clock time) and several seeds, then the kNN top-1 of each encoder next to its random-init baseline.
Writes ``DIR/compare.json`` (every run and the summary), ``DIR/compare.md`` (mean, spread and range per model) and
``DIR/loss.png`` (training loss against time). Runs alternate model order per seed, so drift of the machine spreads
over all models; finished runs are reused when the command is repeated (each run resumes its own folder). The eval
images are decoded once for all kNN passes when they fit in ``EVAL_CACHE_BYTES``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from mimkit.bench import parse_model_spec
from mimkit.config import PretrainConfig, config_from_dict
from mimkit.engine.metrics import read_metrics

# The eval images are decoded once and kept in memory (float32) when they fit in this; a larger eval set (an
# ImageNet-sized kNN) is read from its files for every pass instead.
EVAL_CACHE_BYTES = 4 * 2**30


def _decode_if_small(
    eval_data: str, size, mean, std, in_chans: int, num_workers: int, columns: dict | None = None
) -> dict | None:
    """The eval set decoded (``features.decode_labelled``) when it needs at most EVAL_CACHE_BYTES, else None."""
    from mimkit.data import labelled_splits
    from mimkit.eval.features import decode_labelled
    from mimkit.models._size import pair

    train, val = labelled_splits(eval_data, **(columns or {}))
    h, w = pair(size)
    if (len(train.paths) + len(val.paths)) * in_chans * h * w * 4 > EVAL_CACHE_BYTES:
        return None
    return decode_labelled(eval_data, size, mean, std, in_chans, num_workers, columns)


def _loss_curve(run: Path) -> list[tuple[float, float]]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "time" in r]
    if not rows:
        return []
    t0 = rows[0]["time"]
    return [(r["time"] - t0, r["loss"]) for r in rows]


def run_comparison(
    data: str,
    eval_data: str,
    specs: list[str],
    output: str,
    seeds: list[int],
    epochs: int,
    minutes: float | None = None,
    img_size: int | None = None,
    batch_size: int = 64,
    extra: dict | None = None,
    log=print,
    recipe: str = "",
    eval_columns: dict | None = None,
) -> dict:
    """Pretrain every spec (``name`` or ``name:key=value,...``) for every seed, evaluate, and write the reports.
    ``recipe``: its values (learning rate, warm-up, ...) are the base of every run; the arguments here win.
    ``eval_columns``: ``eval_data``'s image and label columns when it is an hf: dataset (``labelled_splits``)."""
    import torch

    from mimkit.config import load_recipe
    from mimkit.eval import knn_evaluate
    from mimkit.loading import load_pretrained, random_init
    from mimkit.pretraining import method_kwargs, pretrain

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    decoded: dict = {}  # the eval images, decoded once per size and normalisation (2 kNN passes per run read them)
    for k, seed in enumerate(seeds):
        order = specs if k % 2 == 0 else list(reversed(specs))
        for spec in order:
            name, args = parse_model_spec(spec)
            run_dir = out / f"{spec.replace(':', '_').replace(',', '_').replace('=', '-')}-seed{seed}"
            values = dict(load_recipe(recipe)) if recipe else {}
            values.pop("description", None)
            values.update(
                data=data,
                model=name,
                model_args=args or None,
                output=str(run_dir),
                seed=seed,
                epochs=epochs,
                batch_size=batch_size,
                time_limit_min=minutes,
                progress=False,
                resume="auto",
                log_every=10,  # the loss-vs-time curve
                **(extra or {}),
            )
            if img_size:
                values["img_size"] = img_size
            cfg = config_from_dict(PretrainConfig, values, f"compare {spec}")
            log(f"compare: {spec}, seed {seed} -> {run_dir}")
            start = time.time()
            summary = pretrain(cfg)
            model, saved = load_pretrained(str(run_dir))
            size = saved.img_size
            assert size is not None  # a run's saved config has the size the trainer resolved
            key = (str(size), tuple(saved.mean), tuple(saved.std), getattr(model, "in_chans", 3))
            if key not in decoded:
                workers = max(cfg.num_workers, 0)
                decoded[key] = _decode_if_small(eval_data, size, saved.mean, saved.std, key[3], workers, eval_columns)
            kw = dict(decoded=decoded[key], columns=eval_columns)
            knn = knn_evaluate(model, eval_data, size, saved.mean, saved.std, **kw)
            torch.manual_seed(seed)
            # the run's model at random init: its options, size (rectangles too) and channel count
            base = random_init(name, seed=seed, **method_kwargs(saved))
            knn0 = knn_evaluate(base, eval_data, size, saved.mean, saved.std, **kw)
            curve = _loss_curve(run_dir)
            final = summary["final_loss"]
            if not math.isfinite(final) and curve:  # a finished run reused: no step this time, its log has the loss
                final = curve[-1][1]
            runs.append(
                {
                    "spec": spec,
                    "seed": seed,
                    "steps": summary["steps"],
                    "final_loss": final,
                    "pretrain_s": round(time.time() - start, 1),
                    "knn_top1": knn["top1"],
                    "knn_top1_random_init": knn0["top1"],
                    "loss_curve": curve,
                }
            )
    result = {
        "data": data,
        "eval_data": eval_data,
        "epochs": epochs,
        "minutes": minutes,
        "seeds": seeds,
        "img_size": img_size,
        "batch_size": batch_size,
        "recipe": recipe,
        "runs": runs,
        "summary": summarize(runs, specs),
    }
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown_table(result))
    plot_losses(runs, out / "loss.png")
    return result


# The final loss of a run: the mean of its last few logged losses (compare logs every 10 steps), which smooths the
# noise of single batches.
FINAL_LOSS_POINTS = 5


def tail_loss(run: dict) -> float:
    """Mean of the last FINAL_LOSS_POINTS logged losses of a run (its last loss when it has no curve)."""
    tail = [loss for _, loss in run.get("loss_curve", [])[-FINAL_LOSS_POINTS:]]
    return statistics.fmean(tail) if tail else run["final_loss"]


def summarize(runs: list[dict], specs: list[str]) -> list[dict]:
    """Per spec: kNN top-1 mean and spread over seeds, of the pretrained and of the random-init encoder; the final
    training loss (``tail_loss``) mean and spread."""
    rows = []
    for spec in specs:
        mine = [r for r in runs if r["spec"] == spec]
        top1 = [r["knn_top1"] for r in mine]
        base = [r["knn_top1_random_init"] for r in mine]
        tails = [tail_loss(r) for r in mine]
        rows.append(
            {
                "spec": spec,
                "seeds": len(mine),
                "knn_top1_mean": statistics.fmean(top1),
                "knn_top1_sd": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "knn_top1_range": [min(top1), max(top1)],
                "random_init_mean": statistics.fmean(base),
                "steps_mean": statistics.fmean(r["steps"] for r in mine),
                "final_loss_mean": statistics.fmean(r["final_loss"] for r in mine),
                "tail_loss_mean": statistics.fmean(tails),
                "tail_loss_sd": statistics.stdev(tails) if len(tails) > 1 else 0.0,
            }
        )
    return rows


def markdown_table(result: dict) -> str:
    """The comparison as a Markdown table (mean, spread, gain over random init, final loss), summarised again from
    the runs (so a result file written before a column existed gets it too)."""
    budget = f"{result['epochs']} epochs" + (f", cut at {result['minutes']} min" if result["minutes"] else "")
    summary = summarize(result["runs"], [r["spec"] for r in result["summary"]])
    lines = [
        f"Data {result['data']}, kNN on {result['eval_data']}; budget {budget}; seeds {result['seeds']}; final loss ="
        f" mean of each run's last {FINAL_LOSS_POINTS} logged losses.",
        "",
        "| model | seeds | steps | kNN top-1 mean | sd | range | random init | gain | final loss (sd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lo, hi = r["knn_top1_range"]
        lines.append(
            f"| {r['spec']} | {r['seeds']} | {r['steps_mean']:.0f} | {r['knn_top1_mean']:.2f} | "
            f"{r['knn_top1_sd']:.2f} | {lo:.2f}-{hi:.2f} | {r['random_init_mean']:.2f} | "
            f"{r['knn_top1_mean'] - r['random_init_mean']:+.2f} | {r['tail_loss_mean']:.4f} ({r['tail_loss_sd']:.4f}) |"
        )
    means = sorted(r["knn_top1_mean"] for r in summary)
    spread = max((r["knn_top1_sd"] for r in summary), default=0.0)
    if len(means) > 1:
        gap = means[-1] - means[-2]
        verdict = "larger" if gap > 2 * spread else "not larger"
        lines += [
            "",
            f"The gap between the best two means ({gap:.2f}) is {verdict} than twice the largest sd ({spread:.2f}).",
        ]
    return "\n".join(lines) + "\n"


def plot_losses(runs: list[dict], path: Path, size=(720, 420)) -> Path:
    """Training loss against time, one line per run (colour per model), drawn with PIL."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    points = [p for r in runs for p in r["loss_curve"]]
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = 60, 20, size[0] - 20, size[1] - 60
    draw.rectangle([left, top, right, bottom], outline="black")
    if points:
        t_max = max(p[0] for p in points) or 1.0
        lo, hi = min(p[1] for p in points), max(p[1] for p in points)
        hi = hi if hi > lo else lo + 1.0

        def xy(t, v):
            return left + (right - left) * t / t_max, bottom - (bottom - top) * (v - lo) / (hi - lo)

        for r in runs:
            colour = colours[specs.index(r["spec"]) % len(colours)]
            pts = [xy(t, v) for t, v in r["loss_curve"]]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
        draw.text((left, bottom + 5), "0 s", fill="black")
        draw.text((right - 40, bottom + 5), f"{t_max:.0f} s", fill="black")
        draw.text((5, top), f"{hi:.3f}", fill="black")
        draw.text((5, bottom - 10), f"{lo:.3f}", fill="black")
    for i, spec in enumerate(specs):
        draw.text((left + 200 * (i % 3), bottom + 22 + 14 * (i // 3)), spec, fill=colours[i % len(colours)])
    draw.text((left + 5, top + 5), "training loss vs time", fill="black")
    im.save(path)
    return path
