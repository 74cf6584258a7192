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


def test_a_full_disk_while_logging_is_one_warning_and_the_run_goes_on(tiny_folder, tmp_path, monkeypatch):
    """metrics.jsonl (and metrics.csv) are written every few steps, far more often than checkpoints: a write refused
    by a full disk ended the run with a traceback, losing the steps since the last checkpoint though its next save
    might succeed. Now it is one warning until a write succeeds again, the cut line is closed so that every later
    record reads whole, and the run finishes; a checkpoint that cannot be written still stops it (exit 5)."""
    import builtins
    import errno

    import mimkit.engine.metrics as metrics

    writes = {"n": 0}

    class FillingUp:  # the 3rd to 6th writes of the metrics file fail half-way, as a full disk does
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            writes["n"] += 1
            if 3 <= writes["n"] <= 6:
                self.fh.write(text[: len(text) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def opener(path, *args, **kwargs):
        fh = builtins.open(path, *args, **kwargs)
        return FillingUp(fh) if str(path).endswith("metrics.jsonl") else fh

    monkeypatch.setattr(metrics, "open", opener, raising=False)
    out = tmp_path / "run"
    summary = pretrain(pico_config(tiny_folder, out, epochs=2, log_every=1, logger="csv"))
    assert summary["steps"] == 12 and summary["epochs_done"] == 2
    log = (out / "train.log").read_text()
    assert log.count("metrics.jsonl: not written (No space left on device); training goes on") == 1
    rows = [r for r in metrics.read_metrics(out / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps[-1] == 12 and len(steps) >= 8  # the refused ones are missing, every other one is whole
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[-3:])


def test_a_line_cut_by_a_kill_is_closed_before_the_next_record(tmp_path):
    """A metrics file whose last line a kill cut (no resume truncated it, e.g. a compare run read as it is): the
    next record starts on its own line, and the readers leave the cut one out."""
    from mimkit.compare import _loss_curve
    from mimkit.engine.metrics import RunRecorder, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"time": 1.0, "step": 1, "loss": 2.0}\n{"time": 2.0, "st')
    rec = RunRecorder(tmp_path, True, tensorboard=False, progress=False, total_steps=3, start_step=1)
    rec.log({"step": 2, "loss": 1.5}, 2)
    rec.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [loss for _, loss in _loss_curve(tmp_path)] == [2.0, 1.5]


def test_a_reconstruction_figure_the_disk_refuses_is_a_warning(tiny_folder, tmp_path, monkeypatch):
    """--recon-every draws a figure at epoch ends; a full disk there ended the run before its epoch's checkpoint."""
    import errno

    import mimkit.viz

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mimkit.viz, "save_reconstruction_figure", full)
    out = tmp_path / "run"
    summary = pretrain(pico_config(tiny_folder, out, epochs=2, recon_every=1))
    assert summary["epochs_done"] == 2 and list_checkpoints(out)[-1].name == "checkpoint-000000012.pt"
    log = (out / "train.log").read_text()
    assert log.count("epoch-0001.png: not written (No space left on device); training goes on") == 1


def test_tensorboard_events_the_disk_refuses_are_one_warning(tiny_folder, tmp_path, monkeypatch):
    """TensorBoard's writer thread raises a failed write at the next event: a full disk there ended the run."""
    import errno

    from torch.utils.tensorboard import SummaryWriter

    calls = {"n": 0}
    real = SummaryWriter.add_scalar

    def filling(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", filling)
    out = tmp_path / "run"
    summary = pretrain(pico_config(tiny_folder, out, epochs=2, log_every=1, tensorboard=True))
    assert summary["epochs_done"] == 2
    log = (out / "train.log").read_text()
    assert log.count("tensorboard: not written (No space left on device)") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 12


def test_train_log_lines_the_disk_refuses_are_reported_once(tmp_path, capsys):
    """logging prints a traceback block for every record its file handler fails to write: after a full disk, one
    per log line for the rest of the run. Now one line, and the console keeps the records."""
    import errno
    import logging

    from mimkit.engine.metrics import setup_logging

    log = setup_logging(tmp_path, True)
    (handler,) = [h for h in log.handlers if isinstance(h, logging.FileHandler)]

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    handler.stream = Full()
    for i in range(3):
        log.info("step %d", i)
    err = capsys.readouterr().err
    assert err.count("train.log: not written (No space left on device); the console has the log") == 1
    assert "Traceback" not in err and "--- Logging error ---" not in err and "step 2" in err
    setup_logging(None, True)  # the console alone again, for the tests after this one


def test_a_resume_drops_the_csv_rows_an_interrupted_attempt_wrote_past_its_checkpoint(tiny_folder, tmp_path):
    """metrics.jsonl was cut back to the checkpoint's step on resume, metrics.csv was not: the steps an interrupted
    attempt logged after its last checkpoint appeared twice there. Now both hold each step once."""
    out = tmp_path / "run"
    pretrain(pico_config(tiny_folder, out, epochs=1, logger="csv", resume="auto"))  # 6 steps, checkpoint at 6
    with (out / "metrics.csv").open("a") as f:  # an attempt killed at step 8, mid-row
        f.write("1.0,7,loss,9.0\n1.0,7,lr,0.1\n1.0,8,loss,9.0\n1.0,8,l")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"time": 1.0, "step": 7, "loss": 9.0}\n')
    pretrain(pico_config(tiny_folder, out, epochs=2, logger="csv", resume="auto"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["key"] == "loss"] == list(range(1, 13))
    assert "9.0" not in {r["value"] for r in rows} and (out / "metrics.csv").read_text().startswith("time,step,")


def test_a_resume_continues_the_same_wandb_and_mlflow_runs(tiny_folder, tmp_path, monkeypatch):
    """wandb.init(resume="allow") without an id, and mlflow.start_run(run_name=...), started a new tracking run at
    every resume: a requeued job left one wandb or MLflow run per attempt. The ids are now kept in the run folder
    (tracking.json) and a resume continues both; --overwrite moves the file aside with the other outputs. Stand-in
    modules record the calls (both are optional installs)."""
    import importlib.machinery
    import sys
    import types

    calls: dict[str, list] = {"wandb.init": [], "mlflow.start_run": [], "mlflow.log_params": []}

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for key, value in attrs.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)

    def start_run(run_id=None, run_name=None):
        calls["mlflow.start_run"].append(run_id)
        return types.SimpleNamespace(
            info=types.SimpleNamespace(run_id=run_id or f"new{len(calls['mlflow.start_run'])}")
        )

    nothing = lambda *a, **k: None  # noqa: E731
    module("wandb", init=lambda **k: calls["wandb.init"].append(k), log=nothing, finish=nothing, Image=str)
    module(
        "mlflow",
        set_tracking_uri=nothing,
        start_run=start_run,
        log_params=lambda p: calls["mlflow.log_params"].append(p),
        log_metrics=nothing,
        log_artifact=nothing,
        end_run=nothing,
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///nowhere")
    out = tmp_path / "run"
    for epochs in (1, 2):
        pretrain(pico_config(tiny_folder, out, epochs=epochs, logger="wandb,mlflow", resume="auto"))
    first, again = calls["wandb.init"]
    assert first["id"] == again["id"] and again["resume"] == "allow"
    assert calls["mlflow.start_run"] == [None, "new1"] and len(calls["mlflow.log_params"]) == 1
    assert json.loads((out / "tracking.json").read_text()) == {"wandb": first["id"], "mlflow": "new1"}
    pretrain(pico_config(tiny_folder, out, epochs=1, logger="wandb,mlflow", resume="none", overwrite=True))
    assert calls["wandb.init"][-1]["id"] != first["id"] and calls["mlflow.start_run"][-1] is None
