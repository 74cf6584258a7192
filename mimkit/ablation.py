"""Masking ablation (UM-MAE Table 1, scaled down): the same small ViT pretrained with random, grid, uniform and
uniform + secondary masking for an equal number of steps, then final pretraining loss and kNN top-1."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mimkit.config import PretrainConfig, config_from_dict, load_recipe
from mimkit.engine.metrics import read_metrics

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("RS (random, MAE)", dict(sampling="random", sm_ratio=0.0)),
    ("GS (grid)", dict(sampling="grid", sm_ratio=0.0)),
    ("US (uniform)", dict(sampling="uniform", sm_ratio=0.0)),
    ("UM, SM 15%", dict(sampling="uniform", sm_ratio=0.15)),
    ("UM, SM 25%", dict(sampling="uniform", sm_ratio=0.25)),
    ("UM, SM 35%", dict(sampling="uniform", sm_ratio=0.35)),
]
PAPER_LOSS = {
    "RS (random, MAE)": 0.4256,
    "GS (grid)": 0.3682,
    "US (uniform)": 0.3858,
    "UM, SM 15%": 0.4171,
    "UM, SM 25%": 0.4395,
    "UM, SM 35%": 0.4645,
}


def final_loss(run: Path, last_records: int = 5) -> float:
    """Mean of the last few logged training losses (smooths step noise)."""
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    tail = losses[-last_records:]
    return sum(tail) / len(tail)


def run_masking_ablation(
    data: str,
    output: str,
    recipe: str = "ablation_vit_nano_cpu",
    epochs: int | None = None,
    knn: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Pretrain one run per sampling (uniform, grid, random) from ``recipe``, kNN each; one row per run."""
    from mimkit.eval import knn_evaluate
    from mimkit.loading import load_pretrained
    from mimkit.pretraining import pretrain

    rows = []
    for label, args in VARIANTS:
        values = load_recipe(recipe)
        values.update(
            data=data,
            output=str(Path(output) / label.split()[0].lower().replace(",", "") / f"sm{int(args['sm_ratio'] * 100)}"),
            seed=seed,
        )
        values["model_args"] = {**values.get("model_args", {}), **args}
        if epochs is not None:
            values["epochs"] = epochs
        cfg = config_from_dict(PretrainConfig, values, recipe)
        t0 = time.time()
        summary = pretrain(cfg)
        row = {
            "variant": label,
            **args,
            "steps": summary["steps"],
            "final_loss": final_loss(Path(cfg.output)),
            "paper_loss": PAPER_LOSS[label],
            "pretrain_s": round(time.time() - t0, 1),
        }
        if knn:
            model, saved = load_pretrained(cfg.output)
            assert saved.img_size is not None  # a run's saved config has the size the trainer resolved
            row["knn_top1"] = knn_evaluate(model, data, saved.img_size, saved.mean, saved.std)["top1"]
        rows.append(row)
    return rows


def ablation_markdown(rows: list[dict], command: str) -> str:
    """The ablation rows as a Markdown table, with the command that produced them."""
    lines = [
        "| variant | SM ratio | steps | final pretrain loss | paper loss (ViT-B, IN1K, 200 ep) | kNN top-1 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        knn = f"{r['knn_top1']:.2f}" if "knn_top1" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['sm_ratio']:.2f} | {r['steps']} | {r['final_loss']:.4f} | "
            f"{r['paper_loss']:.4f} | {knn} |"
        )
    order = " < ".join(r["variant"] for r in sorted(rows, key=lambda r: r["final_loss"]))
    lines += [
        "",
        f"Measured loss ordering: {order}.",
        "Paper ordering: GS < US < UM-15% < RS < UM-25% < UM-35%.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)
