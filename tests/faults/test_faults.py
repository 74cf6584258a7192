"""Faults injected into real `mimkit pretrain` processes: kill -9 (also mid-write), SIGTERM to the process group,
corrupt checkpoints, two runs in one folder, --resume none into a used folder, divergence, torchrun + SIGTERM.

Each test asserts what was kept, the exit code, and (where the run goes on) that the resumed run ends bit-identical
to an uninterrupted one (CPU, fp32, 2 data-loader workers). docs/reliability.md lists them.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from harness import ENV, INJECT, ckpt_steps, cli, final_weights, finish, logged_steps, run_args, start, wait_for_step

TOTAL_STEPS = 24  # 24 training images / batch 4 = 6 steps per epoch, 4 epochs


def assert_same_weights(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def no_traceback(err: str):
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """An uninterrupted run of the same job."""
    out = tmp_path_factory.mktemp("reference")
    rc, _, err = cli(run_args(tiny_folder, out))
    assert rc == 0, err[-3000:]
    return final_weights(out)


def test_kill9_at_random_steps_and_mid_write_loses_at_most_one_interval(tiny_folder, tmp_path, reference):
    out = tmp_path / "run"
    rng = random.Random(1234)
    kill_steps = sorted(rng.sample(range(2, 13), 3))  # leaves two saves for the mid-write kill below
    report, done_before = [], 0
    for kill_step in kill_steps:
        proc = start(run_args(tiny_folder, out), FAULT_STEP_SLEEP="0.03")
        wait_for_step(proc, out, max(kill_step, done_before + 1))  # past what the last attempt logged
        done_before = logged_steps(out)[-1]
        complete = ckpt_steps(out)
        os.killpg(proc.pid, signal.SIGKILL)
        finish(proc)
        resumed_from = max(ckpt_steps(out) or [0])
        assert resumed_from >= max(complete or [0])  # no finished checkpoint was lost
        report.append(
            {
                "killed_after_step": done_before,
                "restart_step": resumed_from,
                "work_lost_steps": done_before - resumed_from,
            }
        )
    # a kill in the middle of the second checkpoint write of the next attempt
    proc = start(run_args(tiny_folder, out), FAULT_KILL_IN_SAVE="2")
    rc, _, _ = finish(proc)
    assert rc == -signal.SIGKILL
    assert list(out.glob(".checkpoint-*.tmp*"))  # the half-written file is a temporary, never a checkpoint
    rc, _, err = cli(run_args(tiny_folder, out))
    assert rc == 0, err[-3000:]
    no_traceback(err)
    assert not list(out.glob(".checkpoint-*.tmp*"))  # leftovers cleaned at start
    assert_same_weights(final_weights(out), reference)
    steps = logged_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS  # each step once in metrics.jsonl
    assert all(r["work_lost_steps"] <= 6 for r in report), report  # at most one save interval (one epoch)
    (tmp_path / "kill_report.json").write_text(json.dumps(report))


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tiny_folder, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(run_args(tiny_folder, out), FAULT_STEP_SLEEP="0.03")
    wait_for_step(proc, out, 8)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its data-loader workers, as SLURM and timeout do
    rc, out_text, err = finish(proc)
    assert rc == 3, err[-3000:]
    no_traceback(err)
    summary = json.loads(out_text[out_text.index("{") :])
    assert summary["stopped_by"] == "signal:SIGTERM"
    stop_step = summary["steps"]
    assert ckpt_steps(out)[-1] == stop_step and 8 <= stop_step < TOTAL_STEPS
    rc, _, err = cli(run_args(tiny_folder, out))
    assert rc == 0, err[-3000:]
    assert f"resumed from {out / f'checkpoint-{stop_step:09d}.pt'}" in err
    assert_same_weights(final_weights(out), reference)


def test_corrupt_newest_checkpoint_with_keep_last_1_is_moved_aside_and_the_good_one_used(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(run_args(tiny_folder, out, "--keep-last", "1", epochs=2))
    assert rc == 0, err[-3000:]
    assert ckpt_steps(out) == [12]
    (out / "checkpoint-000000099.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    rc, out_text, err = cli(run_args(tiny_folder, out, "--keep-last", "1", epochs=3))
    assert rc == 0, err[-3000:]
    assert "moved unusable checkpoint checkpoint-000000099.pt" in err
    assert (out / "corrupt" / "checkpoint-000000099.pt").is_file()  # kept, not deleted
    assert json.loads(out_text[out_text.index("{") :])["train_steps_this_run"] == 6  # resumed at 12, not 0
    assert ckpt_steps(out) == [18]


def test_a_full_disk_stops_with_exit_5_and_keeps_the_previous_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(run_args(tiny_folder, out), FAULT_DISK_FULL_AT="2")  # the save at the end of epoch 2
    assert rc == 5, err[-3000:]
    no_traceback(err)
    last = err.strip().splitlines()[-1]
    assert "checkpoint-000000012.pt: could not be written (No space left on device)" in last
    assert str(out / "checkpoint-000000006.pt") in last  # names the checkpoint a restart uses
    assert ckpt_steps(out) == [6] and not list(out.glob(".checkpoint-*"))  # no half file left
    rc, _, err = cli(run_args(tiny_folder, out))  # space is back: the rerun resumes
    assert rc == 0 and "resumed from" in err


def test_two_runs_into_one_folder_the_second_is_refused_until_the_first_is_dead(tiny_folder, tmp_path):
    out = tmp_path / "run"
    first = start(run_args(tiny_folder, out, epochs=50), FAULT_STEP_SLEEP="0.02")
    wait_for_step(first, out, 1)
    rc, _, err = cli(run_args(tiny_folder, out))
    assert rc == 2 and err.count("\n") == 1, err
    assert f"in use by another run (host {os.uname().nodename}, pid {first.pid}" in err
    os.killpg(first.pid, signal.SIGKILL)
    finish(first)
    rc, _, err = cli(run_args(tiny_folder, out, epochs=1))
    assert "took over the lock of a run that is no longer running" in err
    assert rc == 0, err[-3000:]


def test_resume_none_into_a_used_folder_needs_overwrite_which_moves_files_aside(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(run_args(tiny_folder, out, epochs=1))
    assert rc == 0
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pt")}
    rc, _, err = cli(run_args(tiny_folder, out, "--resume", "none", model="mae_vit_pico_patch8", epochs=1))
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pt")} == before  # untouched
    rc, _, err = cli(
        run_args(
            tiny_folder,
            out,
            "--resume",
            "none",
            "--overwrite",
            "--img-size",
            "32",
            "--model-arg",
            "decoder_depth=1",
            model="mae_vit_pico_patch8",
            epochs=1,
        )
    )
    assert rc == 0, err[-3000:]
    moved = list(out.glob("replaced-*/checkpoint-*.pt"))
    assert {p.name: p.read_bytes() for p in moved} == before  # the old run's files, byte for byte
    assert final_weights(out)["model_name"] == "mae_vit_pico_patch8"


def test_divergence_rolls_back_then_stops_naming_the_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "run"
    # NaN from the 9th forward on: epoch 1 (6 steps) is saved, then every step is skipped
    rc, _, err = cli(run_args(tiny_folder, out, "--max-bad-steps", "2", "--max-rollbacks", "1"), FAULT_NAN_FROM="9")
    assert rc == 4, err[-3000:]
    no_traceback(err)
    assert "rolled back to checkpoint-000000006.pt (step 6) with the learning rate x 0.5" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged") and f"continues from {out / 'checkpoint-000000006.pt'}" in last
    assert ckpt_steps(out) == [6]
    state = final_weights(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_poisoned_weights_are_never_saved_and_the_message_says_there_is_no_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "run"
    # finite but exploded weights after step 3, before the first save (end of epoch 1 = step 6)
    rc, _, err = cli(run_args(tiny_folder, out, "--on-divergence", "stop"), FAULT_EXPLODE_AT="3")
    assert rc == 4, err[-3000:]
    assert "parameter norm exploded" in err and "No checkpoint has been written" in err
    assert ckpt_steps(out) == []


def test_one_loss_spike_is_skipped_and_the_run_survives(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rc, out_text, err = cli(run_args(tiny_folder, out, epochs=5), FAULT_SPIKE_AT="23")
    assert rc == 0, err[-3000:]
    assert "step 23: loss spike" in err
    assert json.loads(out_text[out_text.index("{") :])["steps"] == 5 * 6 - 1


@pytest.mark.slow
def test_torchrun_two_processes_stopped_by_sigterm_resume_exactly(tiny_folder, tmp_path):
    def torchrun(out, **env):
        args = run_args(tiny_folder, out, "--num-workers", "1")
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", INJECT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**ENV, **env},
            start_new_session=True,
        )

    rc, _, err = finish(torchrun(tmp_path / "full"), 300)
    assert rc == 0, err[-3000:]
    proc = torchrun(tmp_path / "split", FAULT_STEP_SLEEP="0.05")
    wait_for_step(proc, tmp_path / "split", 4)  # 2 ranks x batch 4: 3 steps per epoch, 12 in all
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, err = finish(proc, 300)
    assert rc != 0
    assert "SIGTERM received" in err and "aborting" not in err, err[-3000:]
    saved = ckpt_steps(tmp_path / "split")
    assert saved and 4 <= saved[-1] < 12, (saved, err[-3000:])
    rc, _, err = finish(torchrun(tmp_path / "split"), 300)
    assert rc == 0, err[-3000:]
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "full"))


@pytest.mark.slow
def test_a_dead_rank_makes_the_other_exit_with_a_message(tiny_folder, tmp_path):
    """Two ranks wired by environment variables (no torchrun, which would stop the survivor itself)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = dict(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            FAULT_STEP_SLEEP="0.05",
        )
        procs.append(
            start(run_args(tiny_folder, out, "--num-workers", "0", "--dist-timeout-min", "0.5", epochs=50), **env)
        )
    wait_for_step(procs[0], out, 2)
    os.killpg(procs[1].pid, signal.SIGKILL)
    finish(procs[1])
    t0 = time.time()
    rc, _, err = finish(procs[0], timeout=120)
    assert rc == 1 and time.time() - t0 < 60, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: a collective operation across ranks failed or timed out"), err[-3000:]
    no_traceback(err)


@pytest.mark.slow
def test_a_full_disk_under_torchrun_stops_every_rank_with_the_same_message(tiny_folder, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_folder, out, "--num-workers", "0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", INJECT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "FAULT_DISK_FULL_AT": "2"},
        start_new_session=True,
    )
    t0 = time.time()
    rc, _, err = finish(proc, 300)
    assert rc != 0 and time.time() - t0 < 120, err[-3000:]
    # rank 0 and rank 1 (their stderr may interleave on one line), no rank left waiting
    assert err.count("error: ") >= 2 and err.count("could not be written (No space left on device)") == 2, err[-3000:]
    assert ckpt_steps(out) == [3]  # 2 ranks x batch 4: 3 steps per epoch; the first checkpoint is kept


def test_sharded_checkpoints_survive_a_kill_mid_write_and_a_full_disk(tiny_folder, tmp_path, reference):
    from mimkit.engine import sharded

    out, fmt = tmp_path / "run", ("--checkpoint-format", "sharded")
    proc = start(run_args(tiny_folder, out, *fmt), FAULT_KILL_IN_SAVE="2")  # killed in the 2nd save, half written
    rc, _, _ = finish(proc)
    assert rc == -signal.SIGKILL
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000000006.dcp"]
    assert list(out.glob(".checkpoint-000000012.dcp.tmp*"))  # the half-written folder is a temporary
    rc, _, err = cli(run_args(tiny_folder, out, *fmt), FAULT_DISK_FULL_AT="2")  # resumes; the disk fills at step 18
    assert rc == 5, err[-3000:]
    no_traceback(err)
    last = err.strip().splitlines()[-1]
    assert "checkpoint-000000018.dcp: could not be written (No space left on device), so it was removed" in last
    assert str(out / "checkpoint-000000012.dcp") in last  # the one a restart uses
    assert not list(out.glob(".checkpoint-*"))  # both temporaries gone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000000006.dcp", "checkpoint-000000012.dcp"]
    rc, _, err = cli(run_args(tiny_folder, out, *fmt))  # space is back
    assert rc == 0 and "resumed from" in err, err[-3000:]
    final = sharded.model_state(out / f"checkpoint-{TOTAL_STEPS:09d}.dcp")
    for key, value in reference["model"].items():  # killed, disk full, resumed twice: the uninterrupted weights
        assert torch.equal(final[key], value), key


def test_a_file_system_that_refuses_locks_is_not_a_folder_in_use(tmp_path, monkeypatch, caplog):
    """flock on NFS without its lock daemon (ENOLCK) or a Lustre mount without locks (ENOSYS) raised, and every
    run into such a folder was refused as "in use by another run". Such a folder is now used, with a warning, and a
    live run of the same host, named in the lock file, still blocks; a lock held by another process still refuses."""
    import errno

    from mimkit.engine import run_folder
    from mimkit.errors import RunLockedError

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_folder.fcntl, "flock", refuse)
    with run_folder.RunLock(tmp_path / "a"):
        assert json.loads((tmp_path / "a" / ".mimkit.lock").read_text())["pid"] == os.getpid()
    assert "refuses file locks" in caplog.text
    lock = tmp_path / "b" / ".mimkit.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "started": "?"}))
    with pytest.raises(RunLockedError, match="the file system ignores locks"):
        run_folder.RunLock(tmp_path / "b").acquire()

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(run_folder.fcntl, "flock", held)
    with pytest.raises(RunLockedError, match="in use by another run"):
        run_folder.RunLock(tmp_path / "a").acquire()
