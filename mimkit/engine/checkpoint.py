"""Checkpoints: plain data (``torch.load(weights_only=True)``), written atomically, read back and verified, rotated
only behind newer verified ones, unreadable ones moved aside (never deleted). See docs/reliability.md.

A checkpoint is a file ``checkpoint-<step>.pt`` or a sharded folder ``checkpoint-<step>.dcp``
(``mimkit/engine/sharded.py``); the store lists, rotates, copies and moves aside both the same way."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.errors import CheckpointError, SaveFailed

log = logging.getLogger("mimkit")
_NAME = re.compile(r"^checkpoint-(\d{9})\.(pt|dcp)$")
_TMP = re.compile(r"^\..+\.tmp\d+$")
QUARANTINE = "corrupt"


def checkpoint_path(folder: Path, step: int, sharded: bool = False) -> Path:
    """``folder/checkpoint-<step>.pt`` (or the sharded folder ``checkpoint-<step>.dcp``)."""
    return Path(folder) / f"checkpoint-{step:09d}.{'dcp' if sharded else 'pt'}"


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint file's (or sharded folder's) name, or None for other files."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: a rename is durable after it); silently nothing where that is not supported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, flush, fsync, rename, fsync the folder: a kill never leaves a
    half file under ``path``. A failed write removes its temporary file and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def list_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-*.pt`` files and ``checkpoint-*.dcp`` folders of ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def peek_config(path: Path) -> dict:
    """The saved configuration of a run folder (its config.yaml), a checkpoint file (memory-mapped: no tensor is
    read) or a sharded checkpoint folder (its train_state.pt); {} for anything else or unreadable (the readers
    report what is wrong in their own words)."""
    import yaml

    from mimkit.engine import sharded

    path = Path(path).expanduser()
    try:
        if path.is_dir() and not sharded.is_sharded(path):
            values = yaml.safe_load((path / "config.yaml").read_text())
        else:
            file = path / sharded.STATE_FILE if path.is_dir() else path
            values = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception:  # missing, damaged or foreign
        return {}
    return values if isinstance(values, dict) else {}


def load_checkpoint(path: Path) -> dict:
    """``torch.load(weights_only=True)`` whose every failure is one line naming the file. For a sharded folder:
    its ``train_state.pt`` (``format: sharded``, no tensors), once its files are found complete."""
    from mimkit.engine import sharded

    path = Path(path)
    if sharded.is_sharded(path):
        return sharded.check_complete(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder; give a checkpoint file (or a run folder where a run folder is accepted)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds Python objects beyond tensors and plain data; mimkit does not "
            "execute pickled code from files. Use a file written by mimkit or a plain state "
            "dict."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0][:160]
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({first}); it may be truncated by a kill "
            "or a full disk, or not be a PyTorch file"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dictionary of weights")
    return state


def load_weights(model, weights: dict, path: Path, model_name: str, hint: str = "", strict: bool = True):
    """``model.load_state_dict`` whose shape or key errors name the checkpoint, the model and the fix."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its weights are a {type(weights).__name__}, not a state dict")
    try:
        return model.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit model '{model_name}': {detail[:300]} ...{hint}") from None


def without_stateless_params(saved: dict, optimizer: torch.optim.Optimizer) -> tuple[dict, int] | None:
    """``saved`` (an optimizer state dict) with the parameters that have no optimizer state dropped from the groups
    that hold more parameters than ``optimizer``'s, when that makes every group fit; with the count dropped. A
    parameter without state never had a gradient (AdamW skips it), so nothing is lost: this resumes a run whose model
    has since frozen a parameter that was outside its loss (LoMaR's classifier-side norm). None when it cannot fit."""
    current = optimizer.state_dict()["param_groups"]
    groups, dropped = [], 0
    if len(saved.get("param_groups", [])) != len(current):
        return None
    for old, new in zip(saved["param_groups"], current):
        surplus = len(old["params"]) - len(new["params"])
        if surplus < 0:
            return None
        keep = list(old["params"])
        if surplus:
            stateless = [p for p in keep if p not in saved["state"]]
            if len(stateless) != surplus:
                return None
            keep = [p for p in keep if p in saved["state"]]
            dropped += surplus
        groups.append({**old, "params": keep})
    if not dropped:
        return None
    return {**saved, "param_groups": groups}, dropped


def tensor_leaves(obj, prefix: str = ""):
    """(key path, tensor) of every tensor inside nested dicts / lists."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensor_leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensor_leaves(v, f"{prefix}/{i}")


def nonfinite_tensors(state: dict, keys=("model", "optimizer")) -> list[str]:
    """Key paths of floating tensors under ``keys`` that hold a NaN or an infinity."""
    bad = []
    for key in keys:
        for name, t in tensor_leaves(state.get(key, {}), key):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def verify(written: dict, expected: dict, path: Path) -> None:
    """Raise ``CheckpointError`` unless ``written`` has the keys, shapes and dtypes of ``expected`` and finite
    model and optimizer tensors."""
    want = {k: (tuple(t.shape), t.dtype) for k, t in tensor_leaves(expected)}
    got = {k: (tuple(t.shape), t.dtype) for k, t in tensor_leaves(written)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise CheckpointError(f"{path}: read back differs from what was written ({diff})")
    if set(written) != set(expected):
        raise CheckpointError(f"{path}: read back has keys {sorted(written)}, expected {sorted(expected)}")
    bad = nonfinite_tensors(written)
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:3])}")


def quarantine(path: Path, reason: str) -> Path:
    """Move ``path`` into ``corrupt/`` beside it (never delete it); returns the new path."""
    path = Path(path)
    dest_dir = path.parent / QUARANTINE
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists():
        dest = dest_dir / f"{path.name}.{n}"
        n += 1
    os.replace(path, dest)
    log.warning("moved unusable checkpoint %s to %s (%s)", path.name, dest, reason)
    return dest


def keep_copy(path: Path, keep_as: Path) -> None:
    """A permanent copy of a checkpoint file or sharded folder (hard links where the file system allows them),
    replaced atomically."""
    tmp = keep_as.parent / f".{keep_as.name}.tmp{os.getpid()}"
    if path.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp, copy_function=_link_or_copy)
        replace_folder(tmp, keep_as)
        return
    tmp.unlink(missing_ok=True)
    _link_or_copy(path, tmp)
    os.replace(tmp, keep_as)


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the folder ``tmp`` to ``final`` (a folder of that name written before is replaced after the rename),
    then fsync the parent."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old.tmp{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        _remove(old)
    fsync_dir(final.parent)


def _remove(path: Path) -> None:
    """Delete a checkpoint file or sharded folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class CheckpointStore:
    """The rotating ``checkpoint-*.pt`` files of one run folder.

    A checkpoint counts (is *verified*) once it was read back after its write (or loaded at start) and found
    complete and finite. Rotation deletes a file only when ``keep_last`` newer verified files exist; unreadable
    files are moved to ``corrupt/``; temporary files of interrupted writes are removed at start.
    """

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)
        self.verified: list[Path] = []

    def clean_leftovers(self) -> list[str]:
        """Delete temporary files of interrupted saves; returns their names."""
        removed = []
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if _TMP.match(p.name):  # a file, or the folder of a sharded save, that did not finish
                    _remove(p)
                    removed.append(p.name)
        if removed:
            log.info(
                "removed %d leftover temporary file(s) of interrupted writes: %s",
                len(removed),
                ", ".join(sorted(removed)[:5]),
            )
        return removed

    def latest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads and holds finite weights; newer unusable ones are moved aside."""
        for path in reversed(list_checkpoints(self.folder)):
            try:
                state = load_checkpoint(path)
                bad = nonfinite_tensors(state)
                if "step" not in state or ("model" not in state and state.get("format") != "sharded"):
                    raise CheckpointError(f"{path}: not a mimkit training checkpoint (no 'model' or 'step')")
                if bad:
                    raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:3])}")
            except CheckpointError as err:
                quarantine(path, str(err))
                continue
            self.verified = [path]
            return path, state
        return None

    def save(self, state: dict, step: int) -> Path:
        """Write, read back and verify ``state`` as ``checkpoint-{step}.pt``; then rotate. On any failure the file
        just written is removed and ``SaveFailed`` names the cause; verified checkpoints are untouched."""
        path = checkpoint_path(self.folder, step)
        bad = nonfinite_tensors(state)
        if bad:
            raise SaveFailed(f"{path}: not written: non-finite values in {', '.join(bad[:3])}")
        t0 = time.time()
        try:
            atomic_save(state, path)
        except OSError as err:
            raise SaveFailed(
                f"{path}: could not be written ({err.strerror or err}); free disk space or fix "
                f"permissions in {self.folder}, then rerun to resume from "
                f"{self.describe_latest()}"
            ) from None
        try:
            written = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            verify(written, state, path)
            del written
        except Exception as err:  # a file that does not read back equal is not a checkpoint
            path.unlink(missing_ok=True)
            raise SaveFailed(
                f"{path}: failed verification after writing and was removed ({err}); the last "
                f"verified checkpoint is {self.describe_latest()}"
            ) from None
        self.verified = [p for p in self.verified if p != path] + [path]
        self.rotate()
        log.debug("wrote and verified %s in %.2f s", path.name, time.time() - t0)
        return path

    def commit_sharded(self, tmp: Path, step: int) -> Path:
        """Rank 0, after every rank read its shards back: rename the temporary folder to ``checkpoint-<step>.dcp``,
        count it as verified, rotate."""
        path = checkpoint_path(self.folder, step, sharded=True)
        replace_folder(tmp, path)
        self.verified = [p for p in self.verified if p != path] + [path]
        self.rotate()
        return path

    def rotate(self) -> list[Path]:
        """Delete checkpoints older than the ``keep_last``-th newest verified one."""
        if len(self.verified) < self.keep_last:
            return []
        oldest_kept = checkpoint_step(self.verified[-self.keep_last])
        removed: list[Path] = []
        if oldest_kept is None:
            return removed
        for path in list_checkpoints(self.folder):
            step = checkpoint_step(path)
            if step is not None and step < oldest_kept:
                _remove(path)
                removed.append(path)
        self.verified = [p for p in self.verified if p not in removed]
        return removed

    def newest_verified(self) -> Path | None:
        """The newest checkpoint whose checksum matches, or None."""
        return self.verified[-1] if self.verified else None

    def describe_latest(self) -> str:
        """The newest verified checkpoint's path, or a sentence saying there is none."""
        path = self.newest_verified()
        return str(path) if path is not None else "none (no checkpoint has been written yet)"


def latest_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """Newest usable checkpoint in ``folder`` (unusable newer ones are moved to ``corrupt/``); for a sharded one,
    its train state (see ``load_checkpoint``)."""
    return CheckpointStore(folder, 1).latest()


def capture_rng() -> dict:
    """Python, NumPy, torch CPU and CUDA random states, for an exact resume."""
    version, state, gauss = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple form
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
    }


def restore_rng(rng: dict) -> None:
    """Restore the states ``capture_rng`` returned."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    nps = rng["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
