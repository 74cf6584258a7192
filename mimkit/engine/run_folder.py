"""One run per output folder: an advisory lock naming its holder, and moving old outputs aside instead of deleting."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

from mimkit.errors import RunLockedError

log = logging.getLogger("mimkit")
LOCK_NAME = ".mimkit.lock"
# flock's errors on a file system that does not lock at all (not "another process holds it": EWOULDBLOCK)
LOCKS_UNSUPPORTED = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
# What a run writes into its folder; --overwrite moves these aside (into replaced-<time>/), it never deletes them.
RUN_OUTPUTS = (
    "checkpoint-*.pt",
    "checkpoint-*.dcp",
    "epoch-*.pt",
    "epoch-*.dcp",
    "best.pt",
    "best.dcp",
    "metrics.jsonl",
    "summary.json",
    "train.log",
    "config.yaml",
    "skipped_images.tsv",
    "tensorboard",
    "linprobe.json",
    "linprobe_head.pt",
    "tracking.json",
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``fcntl.flock`` on ``DIR/.mimkit.lock``; the file holds the holder's host, pid and start time.

    The kernel drops the lock when its process dies (kill -9 included), so a lock file left by a dead run is taken
    over with a warning. On file systems without working ``flock`` (one that ignores it, or refuses it: NFS without
    its lock daemon, some Lustre mounts) the same host's live pid still blocks.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fh: IO[str] | None = None
        self.locked = False  # flock taken (False where the file system refuses locks)

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the folder's lock, or raise naming the process that holds it (a stale lock is taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        holder = self._holder()
        desc = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except OSError as err:
            if err.errno not in LOCKS_UNSUPPORTED:  # EWOULDBLOCK: another process holds it
                fh.close()
                raise RunLockedError(
                    f"{self.path.parent}: output folder is in use by another run ({desc}). Wait for it "
                    "to finish, stop it, or give this run another --output."
                ) from None
            log.warning(
                "%s: the file system refuses file locks (%s); a second run into this folder is detected only on "
                "this host",
                self.path.parent,
                os.strerror(err.errno),
            )
        me = socket.gethostname()
        pid = holder.get("pid")
        if holder and holder.get("host") == me and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            self._unlock(fh)
            fh.close()
            raise RunLockedError(
                f"{self.path.parent}: output folder is in use by another run ({desc}; the file "
                "system ignores locks). Wait for it, stop it, or use another --output."
            )
        if holder.get("pid") is not None:
            log.warning("%s: took over the lock of a run that is no longer running (%s)", self.path.parent, desc)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"host": me, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.fh is None:
            return
        try:
            self.fh.seek(0)
            self.fh.truncate()
            self._unlock(self.fh)
        finally:
            self.fh.close()
            self.fh = None

    def _unlock(self, fh) -> None:
        if self.locked:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            self.locked = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def existing_outputs(folder: Path) -> list[Path]:
    """The outputs of an earlier run in ``folder`` (checkpoints, metrics, logs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p for pattern in RUN_OUTPUTS for p in folder.glob(pattern)})


def move_aside(folder: Path) -> Path | None:
    """Move the outputs of an earlier run into ``folder/replaced-<time>/``; returns that folder (None if nothing)."""
    found = existing_outputs(folder)
    if not found:
        return None
    dest = Path(folder) / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = Path(folder) / (time.strftime("replaced-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    log.warning("--overwrite: moved %d earlier output(s) of %s into %s", len(found), folder, dest)
    return dest
