import json
import platform
import subprocess
import sys

import pytest
import timm
import torch

from mimkit.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--data", "--recipe", "--precision", "--resume", "--accum-steps", "--model-arg", "--compile"):
        assert flag in out.stdout


def test_pretrain_knn_export_visualize_end_to_end(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(
        [
            "pretrain",
            "--data",
            str(tiny_folder),
            "--model",
            "mae_vit_pico_patch8",
            "--img-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--warmup-epochs",
            "1",
            "--precision",
            "fp32",
            "--num-workers",
            "0",
            "--output",
            str(run),
            "--no-progress",
            "--model-arg",
            "decoder_depth=1",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 12 and summary["epochs_done"] == 2
    assert (run / "config.yaml").is_file() and (run / "tensorboard").is_dir()
    if platform.libc_ver()[0] == "glibc":  # the default --host-memory keep (mimkit/engine/host_memory.py)
        assert "host memory: freed blocks kept for reuse" in (run / "train.log").read_text()

    assert main(["knn", str(run), "--data", str(tiny_folder), "--k", "5", "--json"]) == 0
    knn = json.loads(capsys.readouterr().out)
    assert knn["top1"] >= 75.0 and knn["n_val"] == 8  # two colour classes; constant features would give 50 %

    enc = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(enc)]) == 0
    assert "timm.create_model('vit_pico_patch8_64'" in capsys.readouterr().out
    net = timm.create_model(
        "vit_pico_patch8_64", pretrained=True, img_size=32, pretrained_cfg_overlay=dict(file=str(enc))
    )
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 1000)

    fig = tmp_path / "fig.png"
    assert (
        main(["visualize", str(run), "--data", str(tiny_folder), "--num", "3", "--out", str(fig), "--stats", "visible"])
        == 0
    )
    assert fig.is_file() and "wrote" in capsys.readouterr().out

    # resume auto on a finished run: nothing to do, same step count
    rc = main(
        [
            "pretrain",
            "--data",
            str(tiny_folder),
            "--model",
            "mae_vit_pico_patch8",
            "--img-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--precision",
            "fp32",
            "--num-workers",
            "0",
            "--output",
            str(run),
            "--no-progress",
            "--model-arg",
            "decoder_depth=1",
        ]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["train_steps_this_run"] == 0


def test_bench_json_side_by_side(capsys):
    assert (
        main(
            [
                "bench",
                "--models",
                "mae_vit_pico_patch8",
                "mae_vit_pico_patch8",
                "--img-size",
                "32",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--precision",
                "fp32",
                "--model-arg",
                "mask_ratio=0.5",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["speed_vs_first"] == 1.0
    assert all(r["images_per_s"] > 0 and r["memory_kind"] == "cpu_peak_rss_growth" for r in rows)


def test_models_and_recipes_listing(capsys):
    assert main(["models"]) == 0
    assert "mae_vit_base_patch16" in capsys.readouterr().out
    assert main(["models", "mae_vit_base_patch16"]) == 0
    assert "decoder_depth = 8" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert "demo_cpu" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "--data", "/nonexistent/folder", "--model", "mae_vit_pico_patch8"], "no such file or folder"),
        (["pretrain", "--data", ".", "--model", "mae_vit_pico_patchh8"], "Did you mean"),
        (
            ["pretrain", "--data", ".", "--model", "mae_vit_pico_patch8", "--model-arg", "decoder_layers=2"],
            "has no option 'decoder_layers'",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(argv, needle, tmp_path, capsys):
    assert main(argv + ["--output", str(tmp_path), "--no-progress"]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_recipe_key(tmp_path, tiny_folder, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("model: mae_vit_pico_patch8\nwarmup: 3\n")
    assert main(["pretrain", "--recipe", str(r), "--data", str(tiny_folder)]) == 2
    assert "unknown option 'warmup'" in capsys.readouterr().err


def test_bad_checkpoints(tmp_path, capsys):
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["export", str(tmp_path / "trunc.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "trunc.pt: not a readable checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    assert main(["export", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a mimkit pretraining checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_ummae_and_simmim_pretrain_from_the_cli(tiny_folder, tmp_path, capsys):
    for model in ("umae_swin_pico_128", "simmim_pvt_pico_128"):
        run = tmp_path / model
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(tiny_folder),
                    "--model",
                    model,
                    "--epochs",
                    "1",
                    "--batch-size",
                    "4",
                    "--precision",
                    "fp32",
                    "--num-workers",
                    "0",
                    "--output",
                    str(run),
                    "--no-progress",
                    "--warmup-epochs",
                    "0.5",
                ]
            )
            == 0
        )
        assert json.loads(capsys.readouterr().out)["steps"] == 6
        assert main(["knn", str(run), "--data", str(tiny_folder), "--k", "3", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_val"] == 8
        assert (
            main(
                [
                    "visualize",
                    str(run),
                    "--data",
                    str(tiny_folder),
                    "--num",
                    "2",
                    "--out",
                    str(tmp_path / f"{model}.png"),
                ]
            )
            == 0
        )
        capsys.readouterr()


@pytest.mark.slow
def test_masking_ablation_runner(tiny_folder, tmp_path, capsys):
    r = tmp_path / "base.yaml"
    r.write_text(
        "model: umae_vit_pico_patch8\nimg_size: 32\nepochs: 1\nbatch_size: 8\nprecision: fp32\n"
        "num_workers: 0\nprogress: false\ntensorboard: false\nlog_every: 1\nwarmup_epochs: 0.5\n"
    )
    assert (
        main(["ablate-masking", "--data", str(tiny_folder), "--output", str(tmp_path / "abl"), "--recipe", str(r)]) == 0
    )
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert f"mimkit ablate-masking --data {tiny_folder}" in table  # the command as called, not sys.argv
    for name in ("RS (random, MAE)", "GS (grid)", "US (uniform)", "UM, SM 15%", "UM, SM 25%", "UM, SM 35%"):
        assert name in table
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert len(rows) == 6 and all(r["steps"] == 3 and r["knn_top1"] >= 62.5 for r in rows)


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_folder, tmp_path, capsys):
    from mimkit.engine.checkpoint import list_checkpoints
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    pretrain(pico_config(tiny_folder, tmp_path / "run", epochs=1))
    path = list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(path, weights_only=True)
    state["config"]["model"] = "mae_vit_nano_patch8"  # claims another architecture than its weights
    torch.save(state, tmp_path / "wrong.pt")
    assert main(["export", str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "do not fit model 'mae_vit_nano_patch8'" in capsys.readouterr().err
    # resuming into a run folder of another model is refused rather than loaded partially
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(tiny_folder),
                "--model",
                "umae_vit_pico_patch8",
                "--img-size",
                "32",
                "--batch-size",
                "4",
                "--output",
                str(tmp_path / "run"),
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
        == 2
    )
    assert "checkpoint is for model 'mae_vit_pico_patch8'" in capsys.readouterr().err


def test_demo_on_a_small_labelled_folder_end_to_end(tiny_folder, tmp_path, capsys):
    """README's first command on a user's folder: pretrain, kNN pretrained and at random init, the figure; a folder
    smaller than the demo's batch (24 training images here) gets a batch that fits."""
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(tiny_folder), "--output", str(out), "--minutes", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "[demo] 24 training images: batch size 16" in printed and "Demo finished" in printed
    result = json.loads((out / "demo_result.json").read_text())
    assert 0 <= result["knn_top1_pretrained"] <= 100 and 0 <= result["knn_top1_random_init"] <= 100
    assert result["pretrain"]["steps"] >= 1 and (out / "reconstruction.png").is_file()


def test_demo_on_an_unlabelled_folder_stops_before_pretraining(tiny_folder, tmp_path, capsys):
    """Its kNN steps need classes: one line naming the folder, exit 2, and no pretraining wasted first."""
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(tiny_folder / "train" / "red"), "--output", str(out), "--minutes", "1"]) == 2
    err = capsys.readouterr().err
    assert "evaluation needs labels" in err and err.count("\n") == 1 and not out.exists()


def test_readme_python_api_block_runs(tmp_path):
    """README's "Python API" block, as written but for the sample folder's absolute path, in a fresh interpreter."""
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "README.md").read_text()
    block = re.search(r"### Python API\s+```python\n(.*?)```", text, re.S).group(1)
    assert "pretrain(cfg)" in block and "knn_evaluate(" in block
    block = block.replace('"examples/sample_images"', repr(str(repo / "examples" / "sample_images")))
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 0 <= float(done.stdout.strip().splitlines()[-1]) <= 100 and (tmp_path / "runs" / "api").is_dir()
