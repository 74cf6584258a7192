"""Sharded checkpoints (``--checkpoint-format sharded``): ``torch.distributed.checkpoint`` (DCP) folders.

``checkpoint-<step>.dcp/`` holds one ``__<rank>_0.distcp`` file per rank that had something to write (each rank
writes only its own shards of the model and optimizer state, nothing is gathered), DCP's ``.metadata`` and
``train_state.pt`` (schedule position, counters, random states, configuration: the non-tensor part of a
``checkpoint-*.pt`` file). The same safety rules as the single-file checkpoints (docs/reliability.md):

- every rank writes into one temporary folder ``.checkpoint-<step>.dcp.tmp<pid>``; DCP fsyncs each file;
- every rank reads its own shards back into fresh tensors and compares them with what it wrote (equal and finite);
  only if all ranks agree does rank 0 rename the folder to its final name, so a kill, a full disk or a failed
  read-back never leaves a folder that looks complete;
- at resume a folder counts when its ``train_state.pt`` loads and every file its metadata names is there.

DCP reshards on load, so a sharded checkpoint resumes on any number of ranks, with FSDP, DDP or one process, and
``mimkit export`` reads its model part without a process group (docs/clusters.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mimkit.engine.checkpoint import atomic_save, load_checkpoint, tensor_leaves
from mimkit.errors import CheckpointError

SUFFIX = ".dcp"
STATE_FILE = "train_state.pt"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder."""
    path = Path(path)
    return path.is_dir() and path.name.endswith(SUFFIX)


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model", "optimizer"} keyed by parameter names: each rank's shards (DTensors) under FSDP, plain tensors
    otherwise. The form DCP saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _empty_like(obj):
    if torch.is_tensor(obj):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: _empty_like(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_empty_like(v) for v in obj]
    return obj


def _single() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _dcp(fn, state: dict, path: Path, single: bool) -> None:
    """``dcp.save`` / ``dcp.load`` without its warning that it "assumes the intent" of one process (it is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=str(path), no_dist=single)


def _all_agree(ok: bool) -> bool:
    if _single():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _reason(err: BaseException) -> str:
    """The first underlying cause of a DCP failure (DCP wraps each rank's exception in a CheckpointException)."""
    causes = [getattr(f, "exception", f) for f in (getattr(err, "failures", None) or {}).values()] or [err]
    for cause in causes:
        if isinstance(cause, OSError):
            return str(cause.strerror or cause)
    text = str(causes[0]).strip()
    return text.splitlines()[0][:200] if text else type(causes[0]).__name__


def write(tmp: Path, state: dict, train_state: dict | None) -> str | None:
    """Collective: every rank writes its shards of ``state`` into ``tmp``, rank 0 (``train_state`` not None) adds
    ``train_state.pt``; then every rank reads its shards back. Returns None when all ranks read back what they
    wrote, else the first problem (the same string on every rank). The caller renames ``tmp`` on success."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    problem = None
    try:
        _dcp(dcp.save, state, tmp, _single())
        if train_state is not None:
            atomic_save(train_state, tmp / STATE_FILE)
    except (OSError, CheckpointException) as err:
        problem = f"could not be written ({_reason(err)})"
    except Exception as err:  # anything else: the same message on every rank, not a traceback on one and a hang
        problem = f"could not be written ({type(err).__name__}: {_reason(err)})"
    if not _all_agree(problem is None):
        return problem or "another rank could not write its shards"
    fresh = _empty_like(state)
    try:
        _dcp(dcp.load, fresh, tmp, _single())
        for (name, wrote), (_, read) in zip(tensor_leaves(state), tensor_leaves(fresh), strict=True):
            a, b = _local(wrote), _local(read)
            if a.is_floating_point() and not bool(torch.isfinite(b).all()):
                problem = f"non-finite values in {name.lstrip('/')}"
                break
            if not torch.equal(a, b):
                problem = f"{name.lstrip('/')} read back differs from what was written"
                break
    except (Exception, CheckpointException) as err:  # a folder that does not read back equal is not a checkpoint
        problem = f"read back failed ({_reason(err)})"
    if not _all_agree(problem is None):
        return problem or "another rank's shards did not read back equal"
    return None


def check_complete(path: Path) -> dict:
    """``train_state.pt`` of a sharded checkpoint whose metadata and every data file it names are present and as
    long as the metadata says; otherwise ``CheckpointError`` naming what is missing. Reads no tensor data."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: sharded checkpoint without its {STATE_FILE}; it was not completely written")
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path}: sharded checkpoint whose .metadata does not read ({_reason(err)})") from None
    needed: dict[str, int] = {}  # data file -> the bytes the metadata says it holds
    for info in (meta.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(f for f in needed if not (path / f).is_file())
    if missing:
        raise CheckpointError(f"{path}: sharded checkpoint lacks {', '.join(missing[:3])}; it is incomplete")
    short = sorted(f for f, n in needed.items() if (path / f).stat().st_size < n)
    if short:
        raise CheckpointError(f"{path}: sharded checkpoint with truncated {', '.join(short[:3])}; it is incomplete")
    return load_checkpoint(path / STATE_FILE)


def load_into(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the model and optimizer state of a sharded checkpoint into this run's (sharded or not)
    model and optimizer, on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = state_dicts(model, optimizer)
    try:
        _dcp(dcp.load, state, path, _single())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"{path}: does not fit this model and optimizer ({_reason(err)}). Were the model options changed? "
            "Use the same options, or another --output."
        ) from None
    bad = [n for n, t in tensor_leaves(state) if t.is_floating_point() and not bool(torch.isfinite(_local(t)).all())]
    if not _all_agree(not bad):
        where = ", ".join(bad[:3]) or "another rank's shards"
        raise CheckpointError(f"{path}: non-finite values in {where}")


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in this process without a process group (for
    export, evaluation and fine-tuning)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    state: dict[str, Any] = {}
    for key, item in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[key.removeprefix("model.")] = torch.empty(item.size, dtype=item.properties.dtype)
    try:
        _dcp(dcp.load, {"model": state}, path, True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{path}: its model shards do not read ({_reason(err)})") from None
    return state
