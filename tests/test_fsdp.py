"""FSDP2 (--strategy fsdp) with 2 CPU processes (gloo): the same weights as DDP, sharded (DCP) and gathered checkpoints
that resume on another number of processes, and an export equal to the DDP one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES

# --host-huge-pages off: no start-up restart of every process (tests/test_host_memory.py tests the restart)
COMMON = ["pretrain", "--data", str(SAMPLES), "--img-size", "32", "--batch-size", "4", "--epochs", "1",
          "--num-workers", "0", "--precision", "fp32", "--no-progress", "--save-every-minutes", "1000",
          "--host-huge-pages", "off"]  # fmt: skip


def _run(args, nproc, tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*(launch if nproc > 1 else [sys.executable]), "-m", "mimkit.cli", *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["umae_swin_pico_128"])  # MAE (timm Sequential blocks): the same, checked by hand
def test_fsdp_matches_ddp_resumes_on_another_world_size_and_exports_the_same_encoder(model, tmp_path):
    from mimkit.cli import main
    from mimkit.engine import sharded

    size = ["--img-size", "64"] if model.startswith("umae") else []
    for strategy in ("fsdp", "ddp"):  # FSDP writes a sharded folder (--checkpoint-format auto), DDP one file
        r = _run(["--model", model, *size, "--max-steps", "3", "--strategy", strategy,
                  "--output", str(tmp_path / strategy)], 2, tmp_path)  # fmt: skip
        if strategy == "fsdp":
            assert "FSDP:" in r.stderr and "blocks and the model sharded over 2 ranks" in r.stderr
            assert "built on the meta device" in r.stderr  # and yet the same weights as DDP (below)
    folder = tmp_path / "fsdp" / "checkpoint-000000003.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.pt"} <= {p.name for p in folder.iterdir()}
    a, b = sharded.model_state(folder), _weights(tmp_path / "ddp" / "checkpoint-000000003.pt")["model"]
    assert a.keys() == b.keys()
    for key in b:  # sharding changes where the numbers live, not the numbers
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    exports = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / f"{strategy}.safetensors"
        assert main(["export", str(tmp_path / strategy), "--out", str(out)]) == 0
        exports[strategy] = load_file(str(out))
    assert exports["fsdp"].keys() == exports["ddp"].keys()
    for key, value in exports["ddp"].items():
        assert torch.allclose(exports["fsdp"][key], value, atol=1e-6), key
    for name in ("fsdp", "ddp"):  # copies at step 3 for the 2-process resumes below
        shutil.copytree(tmp_path / name, tmp_path / f"{name}_2")
    # 2 -> 1 process: the sharded folder resharded onto one process (model and AdamW state, via DCP), against the
    # DDP file resumed in one process: the same 2 steps from the same state
    for name in ("fsdp", "ddp"):
        assert main([*COMMON, "--model", model, *size, "--max-steps", "5", "--strategy", "fsdp", "--no-tensorboard",
                     "--output", str(tmp_path / name)]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["train_steps_this_run"] == 2
    _same_state(*(_weights(tmp_path / d / "checkpoint-000000005.pt") for d in ("fsdp", "ddp")))
    # 2 -> 2: the sharded folder loaded into FSDP shards, written back gathered (--checkpoint-format file), against
    # the DDP file resumed with DDP, which writes a sharded folder from its 2 processes (--checkpoint-format sharded)
    _run(["--model", model, *size, "--max-steps", "5", "--strategy", "fsdp", "--checkpoint-format", "file",
          "--output", str(tmp_path / "fsdp_2")], 2, tmp_path)  # fmt: skip
    _run(["--model", model, *size, "--max-steps", "5", "--checkpoint-format", "sharded",
          "--output", str(tmp_path / "ddp_2")], 2, tmp_path)  # fmt: skip
    fsdp_file = _weights(tmp_path / "fsdp_2" / "checkpoint-000000005.pt")["model"]
    ddp_folder = sharded.model_state(tmp_path / "ddp_2" / "checkpoint-000000005.dcp")
    assert fsdp_file.keys() == ddp_folder.keys()
    for key in fsdp_file:  # 2 steps from the loaded weights and AdamW moments: equal only if both loaded alike
        assert torch.allclose(fsdp_file[key], ddp_folder[key], atol=1e-6), key


def _same_state(one: dict, two: dict) -> None:
    assert one["model"].keys() == two["model"].keys()
    for key in one["model"]:
        assert torch.allclose(one["model"][key], two["model"][key], atol=1e-6), key
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys()
    for i, state in one["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(two["optimizer"]["state"][i][moment], state[moment], atol=1e-7, rtol=1e-4), (
                i,
                moment,
            )


@pytest.mark.slow
def test_epoch_end_evaluations_run_under_fsdp_and_score_the_saved_weights(tiny_folder, tmp_path):
    """The kNN monitor and the reconstruction figure of pretraining, and fine-tuning's val evaluation, call the
    model outside its training forward: under FSDP they stopped the run at the first epoch end ("mixed torch.Tensor
    and DTensor"); now every rank takes part with the root's parameters gathered, and the scores are those of the
    epoch's weights evaluated in one process without FSDP."""
    from test_finetune import _val_top1_of_export

    from mimkit.eval import knn_evaluate
    from mimkit.loading import load_pretrained

    data = ["--data", str(tiny_folder), "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--num-workers", "0",
            "--precision", "fp32", "--no-progress", "--no-tensorboard", "--host-huge-pages", "off",
            "--strategy", "fsdp", "--checkpoint-format", "file"]  # fmt: skip
    commands = {
        "pretrain": [
            "pretrain",
            *data,
            "--model",
            "mae_vit_pico_patch8",
            "--monitor-data",
            str(tiny_folder),
            "--recon-every",
            "1",
        ],  # fmt: skip
        "finetune": ["finetune", *data, "--random-init", "mae_vit_pico_patch8", "--mixup", "0", "--cutmix", "0"],
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command, argv in commands.items():
        out = tmp_path / command
        r = subprocess.run([*launch, "mimkit.cli", *argv, "--output", str(out)], capture_output=True, text=True,
                           timeout=600, env=env, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert "blocks and the model sharded over 2 ranks" in r.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        key = "monitor_knn_top1" if command == "pretrain" else "val_top1"
        logged = [row[key] for row in rows if key in row]
        if command == "pretrain":
            assert (out / "recon" / "epoch-0001.png").is_file()
            model, cfg = load_pretrained(out)
            expected = knn_evaluate(model, str(tiny_folder), 32, cfg.mean, cfg.std)["top1"]
        else:
            from mimkit.cli import main

            assert main(["export", str(out), "--out", str(tmp_path / "clf.safetensors")]) == 0
            expected = _val_top1_of_export(tmp_path / "clf.safetensors", tiny_folder)[0]
        assert logged == [pytest.approx(expected)], (command, logged, expected)
