"""`mimkit bench-data`: it pushes real images through the training loader and reports what it timed."""

import json

from mimkit.cli import main


def test_bench_data_times_the_loader_and_the_model(tiny_folder, capsys):
    args = ["bench-data", "--data", str(tiny_folder), "--img-size", "32", "--batch-size", "4", "--batches", "2"]
    main([*args, "--warmup", "1", "--workers", "0", "1", "--json", "--model", "mae_vit_pico_patch8", "--steps", "1",
          "--device", "cpu"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert [r["workers"] for r in out["loader"]] == [0, 1]
    for row in out["loader"]:
        assert row["images"] == 8 and row["images_per_s"] > 0 and row["skipped"] == 0
    assert out["model"]["model"] == "mae_vit_pico_patch8" and out["model"]["images_per_s"] > 0
    main([*args, "--workers", "0"])
    table = capsys.readouterr().out
    assert "img/s" in table and str(tiny_folder)[-30:] in table


def test_bench_data_says_when_the_source_is_too_small(tiny_folder, capsys):
    rc = main(["bench-data", "--data", str(tiny_folder), "--img-size", "32", "--batch-size", "8", "--batches", "50"])
    assert rc == 2 and "--batches 50" in capsys.readouterr().err
