"""FSDP2 (--strategy fsdp) with 2 CPU processes (gloo): the same weights as DDP, checkpoints that resume on another
number of processes, and an export equal to the DDP one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES

COMMON = ["pretrain", "--data", str(SAMPLES), "--img-size", "32", "--batch-size", "4", "--epochs", "1",
          "--num-workers", "0", "--precision", "fp32", "--no-progress", "--save-every-minutes", "1000"]  # fmt: skip


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
def test_fsdp_matches_ddp_resumes_on_one_process_and_exports_the_same_encoder(model, tmp_path):
    size = ["--img-size", "64"] if model.startswith("umae") else []
    runs = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        r = _run(
            ["--model", model, *size, "--max-steps", "3", "--strategy", strategy, "--output", str(out)], 2, tmp_path
        )
        if strategy == "fsdp":
            assert "FSDP:" in r.stderr and "blocks and the model sharded over 2 ranks" in r.stderr
        runs[strategy] = _weights(out / "checkpoint-000000003.pt")
    a, b = runs["fsdp"], runs["ddp"]
    assert a["model"].keys() == b["model"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    for key in b["model"]:  # sharding changes where the numbers live, not the numbers
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    for i, state in b["optimizer"]["state"].items():
        assert torch.allclose(a["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-9)
    from mimkit.cli import main

    exports = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / f"{strategy}.safetensors"
        assert main(["export", str(tmp_path / strategy), "--out", str(out)]) == 0
        exports[strategy] = load_file(str(out))
    assert exports["fsdp"].keys() == exports["ddp"].keys()
    for key, value in exports["ddp"].items():
        assert torch.allclose(exports["fsdp"][key], value, atol=1e-6), key
    # 2 -> 1 process: the FSDP checkpoint is a plain, complete file
    assert main([*COMMON, "--model", model, *size, "--max-steps", "5", "--strategy", "fsdp", "--no-tensorboard",
                 "--output", str(tmp_path / "fsdp")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["train_steps_this_run"] == 2
