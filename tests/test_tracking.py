"""Tracking during pretraining: extra loggers, the reconstruction grid and the kNN monitor write what they promise,
and do not change the training run."""

import csv
import importlib.util
import json

import pytest
import torch

from mimkit.engine.checkpoint import list_checkpoints, load_checkpoint
from mimkit.pretraining import pretrain

from conftest import pico_config


def _final(out):
    return load_checkpoint(list_checkpoints(out)[-1])["model"]


def test_csv_recon_and_monitor_are_written_and_leave_training_unchanged(tiny_folder, tmp_path):
    plain = tmp_path / "plain"
    pretrain(pico_config(tiny_folder, plain, epochs=2, num_workers=1))
    tracked = tmp_path / "tracked"
    pretrain(
        pico_config(
            tiny_folder,
            tracked,
            epochs=2,
            num_workers=1,
            logger="csv",
            recon_every=1,
            monitor_data=str(tiny_folder),
            tensorboard=True,
        )
    )
    rows = list(csv.DictReader((tracked / "metrics.csv").open()))
    assert {"loss", "lr", "monitor_knn_top1"} <= {r["key"] for r in rows}
    assert sum(r["key"] == "loss" for r in rows) == 12  # log_every 1: one loss per step
    monitor = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    tops = [r["monitor_knn_top1"] for r in monitor if "monitor_knn_top1" in r]
    assert len(tops) == 2 and all(t >= 75.0 for t in tops)  # two colour classes: separable
    assert sorted(p.name for p in (tracked / "recon").iterdir()) == ["epoch-0001.png", "epoch-0002.png"]
    a, b = _final(plain), _final(tracked)
    assert all(torch.equal(a[k], b[k]) for k in a)  # monitoring consumed no random numbers of the run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "reconstruction" in events.Tags()["images"] and "monitor_knn_top1" in events.Tags()["scalars"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (optional extra)")
def test_wandb_offline(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    pretrain(pico_config(tiny_folder, tmp_path, epochs=1, logger="wandb"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (optional extra)")
def test_mlflow_file_store(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pretrain(pico_config(tiny_folder, tmp_path, epochs=1, logger="mlflow"))
    import mlflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and "loss" in runs[0].data.metrics
