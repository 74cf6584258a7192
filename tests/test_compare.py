"""`mimkit compare`: equal-budget runs over seeds, kNN against random init, and the three reports."""

import json
import statistics

import pytest
import torch
from PIL import Image

import mimkit.eval.features as features
from mimkit.cli import main
from mimkit.data import labelled_splits
from mimkit.eval import knn_evaluate
from mimkit.methods import create_method


def test_knn_on_decoded_tensors_equals_knn_on_the_files(tiny_folder):
    torch.manual_seed(0)
    encoder = create_method("mae_vit_pico_patch8", img_size=32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    decoded = features.decode_labelled(tiny_folder, 32, mean, std)
    x, y = decoded["train"]
    assert x.shape[1:] == (3, 32, 32) and x.abs().sum() > 0 and len(y) == len(x)
    files = knn_evaluate(encoder, str(tiny_folder), 32, mean, std, k=3)
    cached = knn_evaluate(encoder, str(tiny_folder), 32, mean, std, k=3, decoded=decoded)
    assert cached == files
    feats, _ = features.extract_features(encoder, labelled_splits(tiny_folder)[0], 32, mean, std)
    assert torch.equal(features.features_of_tensors(encoder, x), feats)


def test_compare_two_models_two_seeds(tiny_folder, tmp_path, capsys, monkeypatch):
    decodes = []
    decode = features.decode_labelled
    monkeypatch.setattr(features, "decode_labelled", lambda *a, **kw: decodes.append(a[1]) or decode(*a, **kw))
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(tiny_folder), "--eval-data", str(tiny_folder), "--models",
               "mae_vit_pico_patch8", "mae_vit_pico_patch8:mask_ratio=0.5", "--seeds", "0", "1", "--epochs", "1",
               "--img-size", "32", "--batch-size", "4", "--num-workers", "0", "--output", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "compare.json").read_text())
    assert [(r["spec"], r["seed"]) for r in result["runs"]] == [
        ("mae_vit_pico_patch8", 0),
        ("mae_vit_pico_patch8:mask_ratio=0.5", 0),
        ("mae_vit_pico_patch8:mask_ratio=0.5", 1),  # the order alternates per seed
        ("mae_vit_pico_patch8", 1),
    ]
    for run in result["runs"]:
        assert run["steps"] == 6 and 0 <= run["knn_top1"] <= 100 and run["loss_curve"]
        assert all(a[0] <= b[0] for a, b in zip(run["loss_curve"], run["loss_curve"][1:]))
    summary = {r["spec"]: r for r in result["summary"]}
    row = summary["mae_vit_pico_patch8"]
    tops = [r["knn_top1"] for r in result["runs"] if r["spec"] == "mae_vit_pico_patch8"]
    assert row["seeds"] == 2 and row["knn_top1_range"] == [min(tops), max(tops)]
    assert abs(row["knn_top1_mean"] - sum(tops) / 2) < 1e-9
    tails = [statistics.fmean(v for _, v in r["loss_curve"][-5:]) for r in result["runs"] if r["spec"] == row["spec"]]
    assert row["tail_loss_mean"] == pytest.approx(statistics.fmean(tails)) and row["tail_loss_mean"] > 0
    table = (out / "compare.md").read_text()
    assert "| mae_vit_pico_patch8:mask_ratio=0.5 | 2 |" in table and table in capsys.readouterr().out
    assert f"{row['tail_loss_mean']:.4f} ({row['tail_loss_sd']:.4f}) |" in table
    assert Image.open(out / "loss.png").size == (720, 420)
    assert decodes == [32]  # 8 kNN passes over the eval set, one decoding
    # a repeated command reuses the finished runs (each resumes its folder and has nothing left to do); with the eval
    # set over the cache limit it is read from the files for each pass, with the same result
    monkeypatch.setattr("mimkit.compare.EVAL_CACHE_BYTES", 0)
    assert main(["compare", "--data", str(tiny_folder), "--eval-data", str(tiny_folder), "--models",
                 "mae_vit_pico_patch8", "--seeds", "0", "--epochs", "1", "--img-size", "32", "--batch-size", "4",
                 "--num-workers", "0", "--output", str(out)]) == 0  # fmt: skip
    again = json.loads((out / "compare.json").read_text())["runs"][0]
    assert again["steps"] == 6 and again["knn_top1"] == result["runs"][0]["knn_top1"]
    assert again["final_loss"] == result["runs"][0]["loss_curve"][-1][1]  # from its log, not NaN
    assert again["knn_top1_random_init"] == result["runs"][0]["knn_top1_random_init"] and decodes == [32]


def test_compare_a_rectangular_recipe_evaluates_random_init_at_that_size(tiny_folder, tmp_path):
    recipe = tmp_path / "rect.yaml"
    recipe.write_text("model: mae_vit_pico_patch8\nimg_size: [32, 48]\n")
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(tiny_folder), "--eval-data", str(tiny_folder), "--recipe", str(recipe),
               "--models", "mae_vit_pico_patch8", "--seeds", "0", "--epochs", "1", "--batch-size", "4",
               "--num-workers", "0", "--output", str(out)])  # fmt: skip
    assert rc == 0
    (run,) = json.loads((out / "compare.json").read_text())["runs"]
    assert 0 <= run["knn_top1_random_init"] <= 100 and 0 <= run["knn_top1"] <= 100


def test_compare_a_one_channel_recipe_evaluates_random_init_with_one_channel(tmp_path):
    """The baseline is the run's model at random init: its channel count too (it was built for RGB and crashed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, cls in enumerate(("dark", "light")):
            (tmp_path / "g" / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((40, 40)) * 20000 + 30000 * c).astype(np.uint16)
                Image.fromarray(arr).save(tmp_path / "g" / split / cls / f"{i}.png")
    recipe = tmp_path / "grey.yaml"
    recipe.write_text("model: mae_vit_pico_patch8\nimg_size: 32\nin_chans: 1\n")
    data, out = str(tmp_path / "g"), tmp_path / "cmp"
    rc = main(["compare", "--data", data, "--eval-data", data, "--recipe", str(recipe), "--models",
               "mae_vit_pico_patch8", "--seeds", "0", "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
               "--output", str(out)])  # fmt: skip
    assert rc == 0
    (run,) = json.loads((out / "compare.json").read_text())["runs"]
    assert 0 <= run["knn_top1_random_init"] <= 100 and 0 <= run["knn_top1"] <= 100
    # the same by flag, without a recipe (compare had no --in-chans: grey 16-bit images became 8-bit RGB)
    out = tmp_path / "cmp-flag"
    rc = main(["compare", "--data", data, "--eval-data", data, "--in-chans", "1", "--img-size", "32", "--models",
               "mae_vit_pico_patch8", "--seeds", "0", "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
               "--output", str(out)])  # fmt: skip
    assert rc == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert "in_chans: 1" in (run_dir / "config.yaml").read_text()
