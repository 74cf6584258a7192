"""Process-group setup for torchrun (LOCAL_RANK / RANK / WORLD_SIZE) and for SLURM's srun without torchrun
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST); nccl on GPU, gloo on CPU. docs/clusters.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the run: rank, local rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    note: str | None = None  # a warning for the run's log (e.g. SLURM tasks that srun did not start)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    first = nodelist.strip()
    depth, cut = 0, len(first)
    for i, ch in enumerate(first):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            cut = i
            break
    first = first[:cut]
    if "[" not in first:
        return first
    prefix, inner = first.split("[", 1)
    head = inner.rstrip("]").split(",")[0].split("-")[0]
    return prefix + head


def tasks_per_node(text: str, node: int = 0) -> int:
    """SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE (``8(x2)``, ``4(x2),2``, ``8``) -> the count of the ``node``-th
    node (SLURM_NODEID) of the step: the nodes of an uneven job run different numbers of tasks."""
    counts: list[int] = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(max(node, 0), len(counts) - 1)]


FIRST_SPECIAL_STEP = 0xFFFFFFF0  # SLURM's batch, extern, interactive and pending steps are numbered from here up


def srun_step(env=os.environ) -> bool:
    """Whether this process is a task of a step that ``srun`` launched. The batch script's shell (and an ``salloc``
    shell) has SLURM_PROCID=0 and the allocation's SLURM_NTASKS as well, but no step ID of its own."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < FIRST_SPECIAL_STEP


def unlaunched_tasks(env=os.environ) -> str | None:
    """A warning when SLURM allocated several tasks but this process is not one that srun (or torchrun) started:
    it runs alone, and the other tasks' GPUs stay idle."""
    tasks = env.get("SLURM_NTASKS", "1")
    if "WORLD_SIZE" in env or srun_step(env) or not tasks.isdigit() or int(tasks) <= 1:
        return None
    return (
        f"the SLURM job has {tasks} tasks, but this process was not started by srun (no SLURM_STEP_ID): it runs as "
        "one process; start every task with `srun mimkit ...` (or torchrun) to use them all (docs/clusters.md)"
    )


def env_from_slurm(env=os.environ) -> bool:
    """Under ``srun`` without torchrun, set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT from SLURM's variables (values already set win). True when SLURM describes several tasks of a step
    that srun launched (``srun_step``): a batch script's own shell has SLURM_PROCID and SLURM_NTASKS too, and joining
    a process group from there would wait for tasks that never start."""
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return False
    if not srun_step(env):
        return False
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    per_node = (
        env.get("SLURM_STEP_TASKS_PER_NODE")
        or env.get("SLURM_TASKS_PER_NODE")
        or env.get("SLURM_NTASKS_PER_NODE")
        or env["SLURM_NTASKS"]
    )
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    node = env.get("SLURM_NODEID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", str(tasks_per_node(per_node, int(node) if node.isdigit() else 0)))
    env.setdefault("MASTER_ADDR", first_host(nodes))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a process of ``local_rank`` drives among the ``visible`` ones it sees: its local rank where it sees the
    node's GPUs (torchrun, plain srun), the one it sees where the scheduler bound a GPU to each task (``srun
    --gpus-per-task=1``, ``--gpu-bind``: CUDA_VISIBLE_DEVICES lists that GPU alone, so every task's is GPU 0)."""
    from mimkit.errors import ConfigError

    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise ConfigError(
        f"local rank {local_rank} (LOCAL_RANK / SLURM_LOCALID) but this process sees {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU "
        "(torchrun --nproc-per-node, srun --ntasks-per-node = the node's GPUs) or bind one GPU to each task (srun "
        "--gpus-per-task=1)"
    )


def _no_group(err: Exception, world: int, timeout_min: float):
    """The one-line error for a process group that did not form."""
    from mimkit.errors import RankLost

    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
    return RankLost(
        f"the process group of {world} ranks did not form at {where} ({reason}): start all {world} (srun --ntasks, "
        f"torchrun --nnodes / --nproc-per-node), check that MASTER_ADDR and MASTER_PORT are reachable and free, or "
        f"raise --dist-timeout-min ({timeout_min:g}) if some start late"
    )


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Join the process group torchrun (or srun, see ``env_from_slurm``) describes; collectives time out after
    ``timeout_min`` so that a dead rank makes the others fail with a message instead of waiting forever."""
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    note = unlaunched_tasks()
    env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"), note=note)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                device_id=dev if use_cuda else None,
                timeout=timedelta(minutes=timeout_min),
            )
        except dist.DistError as err:  # a store timeout (ranks missing), a port in use, an unreachable address
            raise _no_group(err, world, timeout_min) from None
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), dev
    )


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op``: sum, max or min); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (just ``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup(finished: bool = False) -> None:
    """Destroy the process group if one was created. After a run that ``finished`` on every rank, a barrier first: no
    rank closes its connections while a peer is still inside the last collective (with gloo, a rank that tore down
    early made the other abort at exit, now and then, after a good run). After a failure there is no barrier: a
    peer may be gone."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 -- the run's result is already written; the teardown goes on
                pass
        dist.destroy_process_group()
