"""Checkpoints: plain data (loadable with ``torch.load(weights_only=True)``), written atomically, rotated."""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("mimkit")
_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"checkpoint-{step:09d}.pt"


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as err:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: not a readable mimkit checkpoint ({type(err).__name__}: {err}). "
                              "If a run was killed while saving, use the previous checkpoint.") from None


def load_weights(model, weights: dict, path: Path, model_name: str, hint: str = "", strict: bool = True):
    """``model.load_state_dict`` whose shape or key errors name the checkpoint, the model and the fix."""
    try:
        return model.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        lines = str(err).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit model '{model_name}': {detail} ...{hint}") from None


def latest_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """Newest readable checkpoint in ``folder`` (an unreadable newest one is reported and skipped)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    return None


def rotate(folder: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` rotating checkpoints (``epoch-*.pt`` copies are never touched)."""
    ckpts = list_checkpoints(folder)
    for path in ckpts[: max(0, len(ckpts) - max(1, keep_last))]:
        path.unlink(missing_ok=True)


def keep_copy(path: Path, keep_as: Path) -> None:
    """A permanent copy of a checkpoint (a hard link where the file system allows it)."""
    keep_as.unlink(missing_ok=True)
    try:
        os.link(path, keep_as)
    except OSError:
        import shutil

        shutil.copyfile(path, keep_as)


def capture_rng() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    nps = rng["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached"]))
