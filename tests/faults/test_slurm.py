"""SLURM without torchrun: the variables srun sets start a 2-process run; SIGUSR1 with --requeue saves, requeues
through scontrol (a stand-in on PATH records the call) and exits 3 on every rank."""

import json
import os
import signal
import socket

import pytest
from harness import ckpt_steps, cli, finish, run_args, start, wait_for_step

from mimkit.engine.distributed import env_from_slurm, first_host, gpu_index, tasks_per_node, unlaunched_tasks


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu001", "gpu001"),
        ("gpu[003-005,9]", "gpu003"),
        ("gpu[07,09-10],cpu1", "gpu07"),
        ("a1,b2", "a1"),
        ("rack1-node[2-4]", "rack1-node2"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_tasks_per_node_of_an_uneven_job_are_this_nodes():
    """SLURM_TASKS_PER_NODE "4(x2),2": the third node runs 2 tasks; it was given the first node's 4."""
    assert [tasks_per_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]
    assert tasks_per_node("8(x2)", 1) == 8 and tasks_per_node("8") == 8 and tasks_per_node("3,1", 1) == 1
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "10", "SLURM_STEP_ID": "0", "SLURM_NODEID": "2"}
    env["SLURM_TASKS_PER_NODE"] = "4(x2),2"
    assert env_from_slurm(env) and env["LOCAL_WORLD_SIZE"] == "2"


def test_slurm_variables_become_torch_distributed_ones():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[010-011]",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
    }
    assert unlaunched_tasks(env) is None
    assert env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu010" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    torchrun = {"WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}
    assert not env_from_slurm(torchrun) and "RANK" not in torchrun  # torchrun's variables win
    assert not env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})  # one task


@pytest.mark.parametrize("step", [None, str(0xFFFFFFFB), str(0xFFFFFFFA)])  # no step, the batch or interactive step
def test_a_batch_scripts_own_shell_is_not_a_task_of_the_job(step):
    """The batch script's shell (or salloc's) has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but srun did not
    start it: mimkit run there joined a process group of 8 and waited for 7 tasks that never came. It runs alone now,
    with a warning that says how to start every task."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu1"}
    if step is not None:
        env["SLURM_STEP_ID"] = step
    assert not env_from_slurm(env) and "WORLD_SIZE" not in env
    assert "8 tasks" in (unlaunched_tasks(env) or "") and "srun" in (unlaunched_tasks(env) or "")
    assert unlaunched_tasks({**env, "SLURM_NTASKS": "1"}) is None
    assert unlaunched_tasks({**env, "WORLD_SIZE": "8"}) is None  # torchrun started it


def test_pretrain_in_a_batch_scripts_shell_runs_alone_with_a_warning(tiny_folder, tmp_path):
    """Through the CLI: before, it waited for the rendezvous of 8 ranks (30 minutes by default, SIGTERM unheard)."""
    out = tmp_path / "run"
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0", SLURM_JOB_NODELIST="127.0.0.1")
    args = run_args(tiny_folder, out, "--num-workers", "0", "--dist-timeout-min", "0.1", epochs=1)
    rc, _, err = cli(args, timeout=120, MASTER_PORT=str(_free_port()), SLURM_JOB_ID="4243", **env)
    assert rc == 0, err[-2000:]
    assert "not started by srun" in err and "not started by srun" in (out / "train.log").read_text()
    assert json.loads((out / "summary.json").read_text())["ended_by"] == "epochs"


def test_a_task_bound_to_one_gpu_drives_that_gpu(monkeypatch):
    """Under `srun --gpus-per-task=1` every task sees one GPU (CUDA_VISIBLE_DEVICES lists its own), so local rank 3
    must drive GPU 0; it called torch.cuda.set_device(3), "invalid device ordinal". A process that sees several GPUs
    but fewer than its local rank is a one-line error saying how to start the tasks."""
    from mimkit.errors import ConfigError

    assert [gpu_index(r, 8) for r in range(8)] == list(range(8))  # torchrun / srun: every task sees the node's GPUs
    assert [gpu_index(r, 1) for r in range(8)] == [0] * 8  # one GPU bound to each task
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match=r"local rank 5 .* sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=2,3\)"):
        gpu_index(5, 2)


def _slurm_env(rank: int, port: int, bin_dir) -> dict:
    return dict(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        SLURM_TASKS_PER_NODE="2",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        MASTER_PORT=str(port),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_srun_variables_alone_start_two_ranks_and_sigusr1_requeues(tiny_folder, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "run"
    port = _free_port()
    procs = [
        start(
            run_args(tiny_folder, out, "--num-workers", "1", "--requeue", epochs=50),
            FAULT_STEP_SLEEP="0.05",
            **_slurm_env(rank, port, bin_dir),
        )
        for rank in (0, 1)
    ]
    wait_for_step(procs[0], out, 4)
    for p in procs:  # SLURM's --signal=USR1@120 reaches every task
        os.killpg(p.pid, signal.SIGUSR1)
    results = [finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [3, 3], [err[-2000:] for _, _, err in results]
    log = (out / "train.log").read_text()
    assert "cpu x2" in log and "requeued SLURM job 4242" in log
    assert calls.read_text().splitlines() == ["requeue 4242"]  # once, by rank 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal:SIGUSR1" and summary["requeued"] is True
    assert ckpt_steps(out)[-1] == summary["steps"] >= 4


def test_ranks_that_never_join_are_one_line_not_a_traceback(tiny_folder, tmp_path):
    """A task of an srun step whose peers never start (or whose port is taken) ended in torch's DistStoreError
    traceback after --dist-timeout-min; now one line naming the rendezvous address and what to check, exit 1."""
    out = tmp_path / "run"
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="3", SLURM_LOCALID="0", SLURM_JOB_NODELIST="127.0.0.1")
    args = run_args(tiny_folder, out, "--num-workers", "0", "--dist-timeout-min", "0.05", epochs=1)
    port = _free_port()
    rc, _, err = cli(args, timeout=120, MASTER_PORT=str(port), SLURM_JOB_ID="4244", SLURM_STEP_ID="0", **env)
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the process group of 3 ranks did not form at 127.0.0.1:") and str(port) in line
