"""Short real-data run on ../shared/data/caltech101 (skipped when it is absent)."""

import json

import pytest

from mimkit.cli import main

from conftest import CALTECH

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not CALTECH.is_dir(), reason="../shared/data/caltech101 not present"),
]


def test_pretrain_then_knn_on_caltech101(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(
        [
            "pretrain",
            "--data",
            str(CALTECH),
            "--model",
            "mae_vit_pico_patch8",
            "--img-size",
            "32",
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--max-steps",
            "40",
            "--warmup-epochs",
            "0.2",
            "--blr",
            "1e-3",
            "--precision",
            "fp32",
            "--output",
            str(run),
            "--no-progress",
            "--num-workers",
            "1",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 40 and summary["skipped_images"] == 0
    assert main(["knn", str(run), "--data", str(CALTECH), "--json", "--num-workers", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_train"] == 5784 and res["n_val"] == 2893 and res["classes"] == 101
    assert res["top1"] > 5.0  # chance is ~1 %; even briefly trained features separate some classes
