"""The verified checkpoint store and the divergence guard (units; the faults through the CLI are in tests/faults)."""

import math

import pytest
import torch

from mimkit.engine.checkpoint import CheckpointStore, checkpoint_path, list_checkpoints, load_checkpoint
from mimkit.engine.guard import DivergenceGuard, parameter_norm
from mimkit.errors import CheckpointError, SaveFailed


def state(step, value=1.0):
    return {"model": {"w": torch.full((3, 2), value)}, "optimizer": {"state": {}}, "step": step}


def test_rotation_keeps_keep_last_verified_and_deletes_only_older(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        store.save(state(step), step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000000003.pt", "checkpoint-000000004.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path, 4))["step"] == 4


def test_a_write_that_fails_verification_deletes_nothing_good(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(state(1), 1)
    real_load = torch.load

    def corrupting_load(*args, **kwargs):  # the disk returns other bytes than were written
        out = real_load(*args, **kwargs)
        out["model"]["w"] = out["model"]["w"][:1]
        return out

    monkeypatch.setattr(torch, "load", corrupting_load)
    with pytest.raises(SaveFailed, match="failed verification"):
        store.save(state(2), 2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000000001.pt"]  # the good one stays
    assert store.newest_verified() == checkpoint_path(tmp_path, 1)


def test_non_finite_weights_are_never_written(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    with pytest.raises(SaveFailed, match="non-finite"):
        store.save(state(5, float("inf")), 5)
    assert list_checkpoints(tmp_path) == []


def test_start_moves_unusable_checkpoints_aside_and_cleans_temporaries(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(state(1), 1)
    torch.save(state(2, float("nan")), checkpoint_path(tmp_path, 2))  # finite-looking name, NaN weights
    checkpoint_path(tmp_path, 3).write_bytes(b"garbage")
    (tmp_path / ".checkpoint-000000004.pt.tmp999").write_bytes(b"half")
    fresh = CheckpointStore(tmp_path, keep_last=1)
    assert fresh.clean_leftovers() == [".checkpoint-000000004.pt.tmp999"]
    path, found = fresh.latest()
    assert found["step"] == 1 and path == checkpoint_path(tmp_path, 1)
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [
        "checkpoint-000000002.pt",
        "checkpoint-000000003.pt",
    ]


def test_untrusted_pickles_are_refused_without_suggesting_to_run_them(tmp_path):
    import argparse

    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "code.pt")
    assert "does not execute pickled code" in str(err.value) and "weights_only=False" not in str(err.value)


def test_guard_skips_non_finite_and_spikes_and_trips_on_exploded_parameters():
    guard = DivergenceGuard(spike_factor=5.0, param_factor=10.0, window=50, min_history=20)
    assert guard.check_step(float("nan"), 1.0) and guard.check_step(1.0, float("inf"))
    for i in range(19):
        guard.accept(1.0 + 0.01 * i)
    assert guard.check_step(100.0, 1.0) is None  # not enough history yet
    guard.accept(1.0)
    assert "loss spike" in guard.check_step(6.0, 1.0) and guard.check_step(4.0, 1.0) is None
    guard.reset(reference_norm=2.0)
    assert guard.check_params(19.0) is None and "exploded" in guard.check_params(21.0)
    assert "non-finite" in guard.check_params(math.inf)
    off = DivergenceGuard(spike_factor=0.0, param_factor=0.0)
    for _ in range(30):
        off.accept(1.0)
    assert off.check_step(1e6, 1.0) is None and off.check_params(1e30) is None


def test_parameter_norm_is_the_norm_of_all_parameters():
    params = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    assert float(parameter_norm(params)) == pytest.approx(5.0)


def test_optimizer_state_of_a_parameter_frozen_since_is_left_out_on_resume():
    """A parameter that never had a gradient has no AdamW state; a model that now freezes it (LoMaR's unused norm)
    resumes the rest of the state, each moment on its own parameter. A surplus parameter with state does not fit."""
    from mimkit.engine.checkpoint import without_stateless_params

    def build(frozen: bool):
        torch.manual_seed(0)
        net = torch.nn.ModuleDict(
            {"a": torch.nn.Linear(3, 4), "unused": torch.nn.LayerNorm(4), "b": torch.nn.Linear(4, 2)}
        )
        net["unused"].requires_grad_(not frozen)
        return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)

    old, old_opt = build(frozen=False)
    old["b"](old["a"](torch.randn(5, 3))).sum().backward()  # "unused" gets no gradient
    old_opt.step()
    saved = old_opt.state_dict()
    new, new_opt = build(frozen=True)
    fitted, dropped = without_stateless_params(saved, new_opt)
    assert dropped == 2
    new_opt.load_state_dict(fitted)
    for name in ("a", "b"):
        for p_new, p_old in zip(new[name].parameters(), old[name].parameters()):
            assert torch.equal(new_opt.state[p_new]["exp_avg"], old_opt.state[p_old]["exp_avg"])
    old_opt.state[next(old["unused"].parameters())]["exp_avg"] = torch.zeros(4)  # now it has state: no fit
    assert without_stateless_params(old_opt.state_dict(), new_opt) is None
