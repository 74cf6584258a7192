"""Sharded checkpoints (--checkpoint-format sharded, mimkit/engine/sharded.py) in one process: the same training as
the single-file format, exact resume, rotation and epoch copies of folders, incomplete folders moved aside, leftover
temporary folders removed, and a read-back that refuses a folder that does not hold what was written. The
2-process FSDP case is in tests/test_fsdp.py."""

import pytest
import torch

from mimkit.engine import sharded
from mimkit.engine.checkpoint import CheckpointStore, list_checkpoints, load_checkpoint
from mimkit.loading import load_pretrained
from mimkit.pretraining import pretrain

from conftest import pico_config

COMMON = dict(epochs=3, accum_steps=2, save_every_minutes=1e9)


def test_sharded_run_resumes_exactly_and_equals_the_file_format(tiny_folder, tmp_path):
    full = pretrain(pico_config(tiny_folder, tmp_path / "file", **COMMON))
    pretrain(pico_config(tiny_folder, tmp_path / "dcp", max_steps=4, checkpoint_format="sharded", **COMMON))
    rest = pretrain(pico_config(tiny_folder, tmp_path / "dcp", resume="auto", checkpoint_format="sharded", **COMMON))
    assert full["steps"] == rest["steps"] == 9 and rest["train_steps_this_run"] == 5
    newest = list_checkpoints(tmp_path / "dcp")[-1]
    assert newest.name == "checkpoint-000000009.dcp" and sharded.is_sharded(newest)
    assert sorted(p.name for p in newest.iterdir()) == [".metadata", "__0_0.distcp", "train_state.pt"]
    state = load_checkpoint(newest)  # the train state: no tensors of the model
    assert state["format"] == "sharded" and state["step"] == 9 and "model" not in state
    a = load_checkpoint(list_checkpoints(tmp_path / "file")[-1])["model"]
    b = sharded.model_state(newest)
    assert a.keys() == b.keys()
    for key in a:  # 4 steps, a resume from the sharded folder, 5 more: the same weights as one run
        assert torch.equal(a[key], b[key]), key
    model, cfg = load_pretrained(tmp_path / "dcp")  # what export, eval and fine-tuning read
    assert cfg.model == "mae_vit_pico_patch8"
    for key, value in model.state_dict().items():
        assert torch.equal(value, a[key]), key


def test_rotation_and_epoch_copies_of_folders(tiny_folder, tmp_path):
    cfg = pico_config(tiny_folder, tmp_path, epochs=3, keep_last=1, keep_epochs_every=2, checkpoint_format="sharded")
    pretrain(cfg)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".dcp")
    assert names == ["checkpoint-000000018.dcp", "epoch-0002.dcp"]
    assert load_checkpoint(tmp_path / "epoch-0002.dcp")["step"] == 12
    assert sharded.model_state(tmp_path / "epoch-0002.dcp").keys() == sharded.model_state(
        tmp_path / "checkpoint-000000018.dcp").keys()  # fmt: skip


def test_incomplete_newest_folder_is_moved_aside_and_the_run_resumes_from_the_previous(tiny_folder, tmp_path):
    pretrain(pico_config(tiny_folder, tmp_path, epochs=2, checkpoint_format="sharded"))
    old, new = list_checkpoints(tmp_path)
    (new / "__0_0.distcp").unlink()  # a lost data file
    leftover = tmp_path / ".checkpoint-000000099.dcp.tmp123"  # a save killed half-way
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    store = CheckpointStore(tmp_path, 2)
    assert store.clean_leftovers() == [leftover.name] and not leftover.exists()
    path, state = store.latest()
    assert path == old and state["step"] == 6
    assert (tmp_path / "corrupt" / new.name / ".metadata").is_file()  # kept aside, never deleted
    again = pretrain(pico_config(tiny_folder, tmp_path, epochs=2, resume="auto", checkpoint_format="sharded"))
    assert again["train_steps_this_run"] == 6


def test_write_refuses_a_folder_that_does_not_read_back_equal(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0)}, "optimizer": {"state": {}, "param_groups": []}}
    assert sharded.write(tmp_path / "good", state, {"step": 1}) is None
    real_load = dcp.load

    def corrupting_load(sd, **kw):
        real_load(sd, **kw)
        sd["model"]["w"].add_(1)  # what a bit flip on the disk would give

    monkeypatch.setattr(dcp, "load", corrupting_load)
    problem = sharded.write(tmp_path / "bad", state, {"step": 1})
    assert problem is not None and problem.startswith("model/w read back differs")
    state["model"]["w"][0] = float("nan")
    monkeypatch.setattr(dcp, "load", real_load)
    assert "non-finite values in model/w" in sharded.write(tmp_path / "nan", state, {"step": 1})


def test_an_unexpected_error_while_writing_is_a_problem_string_not_a_traceback(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    def failing_save(sd, **kw):
        raise RuntimeError("planner exploded\nsecond line")

    monkeypatch.setattr(dcp, "save", failing_save)
    state = {"model": {"w": torch.arange(6.0)}, "optimizer": {"state": {}, "param_groups": []}}
    problem = sharded.write(tmp_path / "x", state, {"step": 1})
    assert problem == "could not be written (RuntimeError: planner exploded)"


def test_a_folder_without_its_train_state_is_not_a_checkpoint(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []}}
    assert sharded.write(tmp_path / "checkpoint-000000001.dcp", state, None) is None
    with pytest.raises(Exception, match="without its train_state.pt"):
        load_checkpoint(tmp_path / "checkpoint-000000001.dcp")


def test_resume_takes_a_sharded_folder_by_path_and_names_a_run_folder(tiny_folder, tmp_path, capsys):
    """--resume PATH took only files: a sharded checkpoint (checkpoint-N.dcp, or a kept epoch-NNNN.dcp) was 'not an
    existing checkpoint file'. It resumes now, to the same weights as one run; a run folder is one line that says
    what to give."""
    from mimkit.cli import main

    full = pretrain(pico_config(tiny_folder, tmp_path / "file", **COMMON))
    pretrain(pico_config(tiny_folder, tmp_path / "dcp", max_steps=4, checkpoint_format="sharded", **COMMON))
    folder = list_checkpoints(tmp_path / "dcp")[-1]
    assert folder.name == "checkpoint-000000004.dcp"
    rest = pretrain(pico_config(tiny_folder, tmp_path / "fork", resume=str(folder), **COMMON))
    assert rest["steps"] == full["steps"] == 9 and rest["train_steps_this_run"] == 5
    a = load_checkpoint(list_checkpoints(tmp_path / "file")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "fork")[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc = main(
        ["pretrain", "--data", str(tiny_folder), "--output", str(tmp_path / "x"), "--resume", str(tmp_path / "dcp")]
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the earlier runs' log lines may come first
    assert (
        rc == 2 and last.startswith("error: resume (--resume) = ") and "a folder; give one of its checkpoints" in last
    )
