"""SLURM without torchrun: the variables srun sets start a 2-process run; SIGUSR1 with --requeue saves, requeues
through scontrol (a stand-in on PATH records the call) and exits 3 on every rank."""

import json
import os
import signal
import socket

import pytest
from harness import ckpt_steps, finish, run_args, start, wait_for_step

from mimkit.engine.distributed import env_from_slurm, first_host


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


def test_slurm_variables_become_torch_distributed_ones():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[010-011]",
        "SLURM_JOB_ID": "123456",
    }
    assert env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu010" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    torchrun = {"WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}
    assert not env_from_slurm(torchrun) and "RANK" not in torchrun  # torchrun's variables win
    assert not env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # one task: no process group


def _slurm_env(rank: int, port: int, bin_dir) -> dict:
    return dict(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        SLURM_TASKS_PER_NODE="2",
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_JOB_ID="4242",
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
