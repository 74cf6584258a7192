"""One scan for all ranks: rank 0 lists the images and writes ``DIR/data-index.npz`` (paths as a byte buffer and
offsets, labels, and the folders' modification times); the other ranks, and later runs into the same folder, read
it. A cached index is reused while every recorded folder (or the file list) keeps its modification time, which is
checked with one ``stat`` per folder instead of listing them (docs/data.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mimkit.data.patharray import PathArray
from mimkit.data.sources import ImageList, find_images

INDEX_FILE = "data-index.npz"


def _still_valid(meta: dict, data: str) -> bool:
    if meta.get("data") != os.path.realpath(data) or meta.get("version") != 1:
        return False
    try:
        return all(os.stat(folder).st_mtime_ns == mtime for folder, mtime in meta["dirs"])
    except OSError:
        return False


def load_index(path: Path, data: str) -> ImageList | None:
    """The cached image list of ``data`` at ``path``, or None when absent, unreadable or out of date."""
    if not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if not _still_valid(meta, data):
                return None
            paths = PathArray.from_arrays(z["buffer"], z["offsets"])
            labels = z["labels"] if meta["labelled"] else None
    except (OSError, ValueError, KeyError):
        return None
    return ImageList(paths, labels, meta["classes"], meta["root"], meta["ignored"])


def write_index(path: Path, data: str, images: ImageList, dirs: list) -> None:
    """Write the image index of ``data`` (paths, labels, classes, the scanned folders) to ``path`` atomically."""
    meta = {
        "version": 1,
        "data": os.path.realpath(data),
        "dirs": dirs,
        "classes": images.classes,
        "root": images.root,
        "ignored": images.ignored,
        "labelled": images.labels is not None,
    }
    paths = images.paths if isinstance(images.paths, PathArray) else PathArray(images.paths)
    labels = np.asarray(images.labels if images.labels is not None else [], dtype=np.int64)
    tmp = Path(path).with_suffix(".tmp.npz")
    np.savez(tmp, buffer=paths.buffer, offsets=paths.offsets, labels=labels, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def indexed_images(data: str, cache_dir: Path) -> ImageList:
    """``find_images(data)`` through the cache in ``cache_dir`` (scan and write it when missing or out of date)."""
    path = Path(cache_dir) / INDEX_FILE
    cached = load_index(path, data)
    if cached is not None:
        return cached
    dirs: list = []
    images = find_images(data, dirs=dirs)
    try:
        write_index(path, data, images, dirs)
    except OSError:
        pass  # a read-only output folder: the scan result is still good
    return images
