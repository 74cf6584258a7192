import json
import math
import os

import pytest
import torch

from mimkit.engine.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint
from mimkit.engine.trainer import TrainingDiverged
from mimkit.methods.mae import MAE
from mimkit.methods.registry import register_preset
from mimkit.pretraining import PretrainTrainer as Trainer
from mimkit.pretraining import pretrain

from conftest import pico_config


def _final_state(out):
    return load_checkpoint(list_checkpoints(out)[-1])


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_folder, tmp_path):
    common = dict(epochs=3, accum_steps=2, save_every_minutes=1e9)
    full = pretrain(pico_config(tiny_folder, tmp_path / "full", **common))
    assert full["steps"] == 9  # 24 images / batch 4 / accum 2 = 3 steps per epoch
    assert full["ended_by"] == "epochs"
    part = pretrain(pico_config(tiny_folder, tmp_path / "split", max_steps=4, **common))  # stops mid-epoch 2
    assert part["steps"] == 4 and part["ended_by"] == "max_steps"  # why it ended, for a scheduler's script
    assert "ended at --max-steps after step 4 of 9 (epoch 1 of 3)" in (tmp_path / "split" / "train.log").read_text()
    rest = pretrain(pico_config(tiny_folder, tmp_path / "split", resume="auto", **common))
    assert rest["steps"] == 9 and rest["train_steps_this_run"] == 5 and rest["ended_by"] == "epochs"
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "split")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_checkpoint_is_plain_data_and_loads_weights_only(tiny_folder, tmp_path):
    pretrain(pico_config(tiny_folder, tmp_path, epochs=1))
    path = list_checkpoints(tmp_path)[-1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng", "config"} <= set(state)
    assert any(k.startswith("decoder.") for k in state["model"])  # the decoder is kept
    assert state["config"]["model"] == "mae_vit_pico_patch8" and state["epoch"] == 1
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("images_per_s" in r and "lr" in r and "loss" in r for r in records)


def test_rotation_keeps_latest_and_permanent_epoch_copies(tiny_folder, tmp_path):
    pretrain(pico_config(tiny_folder, tmp_path, epochs=2, keep_last=1, keep_epochs_every=1))
    pretrain(pico_config(tiny_folder, tmp_path, epochs=4, keep_last=1, keep_epochs_every=1, resume="auto"))
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["checkpoint-000000024.pt", "epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    assert load_checkpoint(tmp_path / "epoch-0002.pt")["step"] == 12


def test_dataset_smaller_than_a_batch_is_a_clear_error(tiny_folder, tmp_path):
    from mimkit.data import DataError

    with pytest.raises(DataError, match="fewer than one batch of 64"):
        pretrain(pico_config(tiny_folder, tmp_path, batch_size=64))


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-000000001.pt"
    atomic_save({"x": torch.ones(3)}, target)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(3))


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    atomic_save({"model": {"w": torch.ones(2)}, "step": 1}, tmp_path / "checkpoint-000000001.pt")
    atomic_save({"model": {"w": torch.ones(2)}, "step": 2}, tmp_path / "checkpoint-000000002.pt")
    data = (tmp_path / "checkpoint-000000002.pt").read_bytes()
    (tmp_path / "checkpoint-000000002.pt").write_bytes(data[: len(data) // 2])
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "checkpoint-000000001.pt" and state["step"] == 1
    assert (tmp_path / "corrupt" / "checkpoint-000000002.pt").read_bytes() == data[: len(data) // 2]  # kept aside


class FlakyMAE(MAE):
    """Returns a NaN loss on chosen forward calls (simulates one bad step)."""

    bad_calls: set = set()

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def forward(self, batch):
        loss, out = super().forward(batch)
        self.calls += 1
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return loss, out


register_preset(
    "test_flaky_mae",
    FlakyMAE,
    "test only",
    encoder="vit_pico_patch8_64",
    img_size=32,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
)


def test_one_nonfinite_step_is_skipped_and_the_run_survives(tiny_folder, tmp_path, caplog):
    FlakyMAE.bad_calls = {3}
    summary = pretrain(pico_config(tiny_folder, tmp_path, model="test_flaky_mae", epochs=2))
    assert summary["steps"] == 2 * 6 - 1  # one step skipped
    assert math.isfinite(summary["final_loss"])
    state = _final_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_repeated_nonfinite_steps_stop_the_run(tiny_folder, tmp_path):
    FlakyMAE.bad_calls = set(range(4, 100))
    with pytest.raises(TrainingDiverged, match="consecutive"):
        pretrain(
            pico_config(tiny_folder, tmp_path, model="test_flaky_mae", epochs=3, max_bad_steps=3, on_divergence="stop")
        )
    FlakyMAE.bad_calls = set()


def test_learning_rate_scaling_and_schedule(tiny_folder, tmp_path):
    t = Trainer(pico_config(tiny_folder, tmp_path, batch_size=4, accum_steps=2, blr=2.56e-2, warmup_epochs=1, epochs=4))
    t.setup()
    t.lock.release()
    assert t.lr == pytest.approx(2.56e-2 * 8 / 256)
    lrs = []
    for step in range(t.total_steps + 1):
        t.scheduler.step_update(step)
        lrs.append(t.optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0 and lrs[t.steps_per_epoch] == pytest.approx(t.lr)  # linear warm-up over one epoch
    assert lrs[-1] == pytest.approx(0, abs=1e-9) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    decay = {id(p) for g in t.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in t.model.named_parameters():
        if p.requires_grad:
            assert (id(p) in decay) == (p.ndim > 1 and not name.endswith(".bias")), name


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mae_vit_pico_patch8", "lomar_vit_pico_patch8"])  # LoMaR: an unused norm failed DDP
def test_two_process_ddp_replicas_stay_identical(tiny_folder, tmp_path, model):
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            worker,
            str(tiny_folder),
            str(tmp_path),
            model,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "ddp_result.json").read_text())
    assert result["world_size"] == 2 and result["identical"] and result["steps"] == 3
    assert result["effective_batch"] == 8


@pytest.mark.parametrize("model", ["mae_vit_pico_patch8", "umae_swin_pico_128"])
def test_bf16_autocast_training_is_finite(tiny_folder, tmp_path, model):
    kw = {} if model.startswith("mae") else {"img_size": 128}
    summary = pretrain(
        pico_config(tiny_folder, tmp_path, model=model, precision="bf16", cpu_autocast=True, epochs=1, **kw)
    )
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    state = _final_state(tmp_path)
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # master weights stay fp32


def test_resume_with_another_batch_layout_carries_the_epoch_position_and_schedule_over(tiny_folder, tmp_path):
    """A requeue with another batch size (or GPU count): the epoch goes on after the images already trained on, the
    lr schedule from the same point of the epoch, the step counter keeps counting (checkpoint names stay in order)."""
    cfg = dict(epochs=2, resume="auto", warmup_epochs=0)
    first = pretrain(pico_config(tiny_folder, tmp_path / "run", batch_size=4, max_steps=3, **cfg))  # 12 images
    assert first["steps"] == 3
    again = pretrain(pico_config(tiny_folder, tmp_path / "run", batch_size=8, **cfg))  # 3 steps per epoch now
    # 12 images = 1 step of 8 done in epoch 1 (4 images again); 2 more there and 3 in epoch 2
    assert again["train_steps_this_run"] == 5 and again["steps"] == 8 and again["epochs_done"] == 2
    log = (tmp_path / "run" / "train.log").read_text()
    assert "x batch 4 x 1 micro-batch(es), this run has 1 x 8 x 1: epoch 1 goes on after 8 of its images" in log
    assert "the lr schedule at its step 1 of 6; the step counter goes on from 3" in log
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in r]
    # the logged epoch is the schedule's: 2 of epoch 1's 3 steps after the first step of the resumed run (not 4 / 3)
    assert [(r["step"], r["epoch"]) for r in rows][3:] == [(4, 0.6667), (5, 1.0), (6, 1.3333), (7, 1.6667), (8, 2.0)]


def test_resume_on_a_bigger_batch_after_an_epoch_end_trains_the_remaining_epochs(tiny_folder, tmp_path):
    """A requeue on more GPUs (or a bigger batch) after an epoch's checkpoint: the step counter is then ahead of this
    layout's steps, and the run compared it with its total and ended at once, reporting success with the epochs left
    untrained. It now goes by its position in the schedule (Trainer.position)."""
    cfg = dict(epochs=2, resume="auto", warmup_epochs=0, tensorboard=True)
    first = pretrain(pico_config(tiny_folder, tmp_path / "run", batch_size=4, max_steps=6, **cfg))  # epoch 1 of 2
    assert first["steps"] == 6  # all 24 images of epoch 1 (its end is counted on resuming)
    again = pretrain(pico_config(tiny_folder, tmp_path / "run", batch_size=8, **cfg))  # 3 steps per epoch, 6 in all
    assert again["train_steps_this_run"] == 3 and again["epochs_done"] == 2 and again["steps"] == 9
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in r]
    assert [(r["step"], r["epoch"]) for r in rows][-3:] == [(7, 1.3333), (8, 1.6667), (9, 2.0)]


def test_a_resume_with_changed_options_says_which(tiny_folder, tmp_path):
    """A requeue from an edited job script (more epochs, another mask ratio) went on silently with the new options,
    the lr jumping to where the new schedule put it. The log now names every option that changes what is trained,
    old -> new; speed and layout options (workers, batch: relayout has its own line) are not named."""
    out = tmp_path / "run"
    pretrain(pico_config(tiny_folder, out, epochs=1, resume="auto"))
    pretrain(pico_config(tiny_folder, out, epochs=2, resume="auto", num_workers=1, mask_ratio=0.6))
    log = (out / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "was written with other options" in ln)
    assert "epochs 1 -> 2" in line and "mask_ratio None -> 0.6" in line and "lr follows the new schedule" in line
    assert "num_workers" not in line
    pretrain(pico_config(tiny_folder, out, epochs=3, resume="auto", mask_ratio=0.6, num_workers=1, max_steps=100))
    last = [ln for ln in (out / "train.log").read_text().splitlines() if "was written with other options" in ln][-1]
    assert last.endswith(
        "epochs 2 -> 3. This run goes on with its own (the lr follows the new schedule from this "
        "step on: it jumps where the schedule moved)"
    )


def test_a_time_limit_ends_with_a_checkpoint_and_says_so(tiny_folder, tmp_path):
    """--time-limit-min ends a run with exit code 0 and a checkpoint; the summary's ended_by tells it from a
    finished run (stopped_by stays for signals, exit 3), and the log says how to continue."""
    out = tmp_path / "run"
    summary = pretrain(pico_config(tiny_folder, out, epochs=50, time_limit_min=1e-6))
    assert summary["ended_by"] == "time_limit" and summary["stopped_by"] is None
    assert 1 <= summary["steps"] < 300 and summary["checkpoint"].endswith(f"checkpoint-{summary['steps']:09d}.pt")
    assert "the same command continues from" in (out / "train.log").read_text()
    assert json.loads((out / "summary.json").read_text())["ended_by"] == "time_limit"


def test_loader_workers_per_rank_count_cpus_bound_to_the_task_once():
    """`srun --cpus-per-task=12` on a 96-CPU node with 8 GPUs: each task's affinity is its own 12 CPUs, which were
    divided by 8 ranks again, so every GPU got one loader worker. Now a rank's own CPUs count once; under torchrun
    (every rank sees the node's CPUs) they are shared out as before."""
    from mimkit.engine.data import default_workers

    gpu = torch.device("cuda", 0)
    assert default_workers(gpu, 8, cpus=12, node_cpus=96) == 10  # srun binding: 12 of its own, one for the rank
    assert default_workers(gpu, 8, cpus=6, node_cpus=96) == 5
    assert default_workers(gpu, 8, cpus=96, node_cpus=96) == 10  # torchrun: 96 / 8 = 12
    assert default_workers(gpu, 8, cpus=32, node_cpus=96) == 3  # the job's 32 CPUs shared by 8 ranks: 4 each
    assert default_workers(gpu, 1, cpus=4, node_cpus=96) == 3
    assert default_workers(torch.device("cpu"), 2, cpus=2, node_cpus=2) == 1
