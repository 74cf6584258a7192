"""Find images: a labelled ImageFolder root, any folder tree of unlabelled images, or a text file listing paths."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mimkit.data.patharray import PathArray
from mimkit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageList", "find_images", "labelled_splits", "scan_tree"]


@dataclass
class ImageList:
    """Image paths with optional integer labels (``labels`` is None for unlabelled data). Paths are kept in a
    ``PathArray`` and labels in a numpy array, which forked data-loader workers share instead of copying."""

    paths: Sequence[str]
    labels: Sequence[int] | np.ndarray | None = None  # an int64 array after __post_init__
    classes: list[str] = field(default_factory=list)
    root: str = ""
    ignored: dict[str, int] = field(default_factory=dict)  # files skipped for an unsupported type, by extension

    def __post_init__(self) -> None:
        if not isinstance(self.paths, PathArray):
            self.paths = PathArray(self.paths)
        if self.labels is not None and not isinstance(self.labels, np.ndarray):
            self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_tree(root: Path, ignored: Counter | None = None, dirs: list | None = None) -> list[str]:
    """All image files below ``root`` (recursive, sorted, hidden entries skipped, symlinked folders followed).

    Each real folder is visited once and each real file listed once, so symlink loops and links to folders or files
    already seen add nothing; only symlinks pay for resolving their target. Other files are counted by extension in
    ``ignored``; ``dirs`` receives (folder, modification time in ns) of every folder visited (for index caching)."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            if dirs is not None:
                dirs.append((folder, os.stat(folder).st_mtime_ns))
        except OSError:  # unreadable folder: nothing to list
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                subdirs.append(entry.path)
                continue
            if not _is_image(entry.name):
                if ignored is not None:
                    ignored[os.path.splitext(entry.name)[1].lower()] += 1
                continue
            key = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
            if key not in seen_files:
                seen_files.add(key)
                found.append(entry.path)
        stack.extend(reversed(subdirs))  # depth first, in sorted order (as os.walk with sorted folders)
    return found


TABLE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl")  # always tables; a .csv / .tsv only with 2+ columns


def _not_a_table(path: Path) -> None:
    """A DataError when ``path`` is a table (Parquet, Arrow, JSON, or a CSV / TSV with several columns) given where a
    list of image paths is read: such a file is read by datasets, as ``hf:PATH``."""
    suffix = path.suffix.lower()
    table = suffix in TABLE_SUFFIXES
    if suffix in (".csv", ".tsv"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                first = next((line for line in f if line.strip() and not line.startswith("#")), "")
        except OSError:
            first = ""
        table = ("," if suffix == ".csv" else "\t") in first
    if table:
        raise DataError(
            f"{path}: a table, not a list of image paths; give it as --data hf:{path} (datasets reads its columns: "
            "the image paths or bytes, and the labels for evaluation; docs/data.md)"
        )


def read_file_list(list_file: Path) -> list[str]:
    """One image path per line; blank lines and ``#`` comments ignored; relative paths are relative to the list file."""
    if list_file.name.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(
            f"{list_file}: is an image, not a folder or a list of images. Point --data at the folder "
            "that holds it, or at a text file listing image paths."
        )
    _not_a_table(list_file)
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{list_file}: not a text file listing image paths (it is not UTF-8 text). --data takes a "
            "folder of images, an ImageFolder root, or a text file with one image path per line."
        ) from None
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_absolute():
            path = list_file.parent / path
        paths.append(str(path))
    return paths


def _class_folder_list(split_dir: Path, classes: list[str] | None = None, dirs: list | None = None) -> ImageList:
    class_dirs = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = class_dirs
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    ignored: Counter = Counter()
    for c in class_dirs:
        if c not in index:
            raise DataError(
                f"{split_dir / c}: class folder not present in the training split; "
                f"val/ must use the class names of train/ ({', '.join(classes[:5])}, ...)"
            )
        for p in scan_tree(split_dir / c, ignored, dirs):
            paths.append(p)
            labels.append(index[c])
    return ImageList(paths, labels, classes, str(split_dir), dict(ignored))


def _require_images(images: ImageList, where: Path) -> ImageList:
    if len(images) == 0:
        counts = ", ".join(f"{n} {ext or 'without extension'}" for ext, n in sorted(images.ignored.items()))
        other = f" (only other files: {counts})" if counts else ""
        raise DataError(
            f"{where}: no images found{other}. Accepted extensions: {', '.join(IMAGE_EXTENSIONS)} "
            "(case-insensitive, searched recursively). Point --data at a folder of images, an "
            "ImageFolder root with train/ (and val/), or a text file with one image path per line."
        )
    return images


def is_labelled_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a labelled dataset root (a folder with a ``train/`` class tree)."""
    p = Path(path)
    return p.is_dir() and (p / "train").is_dir()


def find_images(path: str | os.PathLike, split: str = "train", dirs: list | None = None) -> ImageList:
    """Images for pretraining (labels kept when the source has them).

    ``path`` may be an ImageFolder root (``train/`` and optional ``val/``: the named split is used), any folder tree
    of images (all of them, unlabelled), or a text file listing image paths.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"{p}: no such file or folder. --data takes a folder of images, an ImageFolder root "
            "(train/, optional val/) or a text file listing image paths."
        )
    if p.is_file():
        if dirs is not None:
            dirs.append((str(p), os.stat(p).st_mtime_ns))
        return _require_images(ImageList(read_file_list(p), root=str(p)), p)
    if is_labelled_root(p):
        split_dir = p / split
        if not split_dir.is_dir():
            raise DataError(f"{p}: has no {split}/ folder")
        if dirs is not None:
            dirs.append((str(split_dir), os.stat(split_dir).st_mtime_ns))
        return _require_images(_class_folder_list(split_dir, dirs=dirs), split_dir)
    ignored: Counter = Counter()
    images = ImageList(scan_tree(p, ignored, dirs), root=str(p), ignored=dict(ignored))
    return _require_images(images, p)


def labelled_splits(
    path: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_column: str = "",
    label_column: str = "",
    flags: tuple[str, str] | None = None,
) -> tuple[ImageList, ImageList]:
    """Train and val splits with labels (``_labelled_splits``), of at least two classes: a score over one class is
    100 % whatever the features (a folder of unlabelled images under one sub-folder looks like one class), so such
    a source is a DataError."""
    train, val = _labelled_splits(path, val_fraction, seed, image_column, label_column, flags)
    present = sorted({int(y) for y in train.labels} if train.labels is not None else set())
    if len(present) < 2:
        names = ", ".join(str(train.classes[y]) for y in present[:3]) if train.classes else "none"
        raise DataError(
            f"{path}: its training split holds images of {len(present)} class ({names}); an evaluation needs at "
            "least 2 (an ImageFolder root: train/<class>/ with one folder per class)"
        )
    return train, val


def _labelled_splits(
    path: str | os.PathLike,
    val_fraction: float,
    seed: int,
    image_column: str,
    label_column: str,
    flags: tuple[str, str] | None,
) -> tuple[ImageList, ImageList]:
    """Train and val splits with labels, for kNN and other evaluations.

    Needs an ImageFolder root: ``train/<class>/*`` and ideally ``val/<class>/*``. Without ``val/`` a fixed, seeded
    ``val_fraction`` of every class is held out. An ``hf:`` source is a labelled Hugging Face dataset
    (``mimkit.data.hf.hf_labelled_splits``), whose columns ``image_column`` and ``label_column`` may name (given by
    the options ``flags``, named in errors).
    """
    from mimkit.data.hf import COLUMN_FLAGS, hf_labelled_splits, is_hf_source

    flags = flags or COLUMN_FLAGS

    if is_hf_source(str(path)):  # a labelled Hugging Face dataset (mimkit/data/hf.py)
        return hf_labelled_splits(str(path), val_fraction, seed, image_column, label_column, flags)  # type: ignore[return-value]
    for flag, value in zip(flags, (image_column, label_column), strict=True):
        if value:
            raise DataError(f"{flag} {value}: only for Hugging Face sources (hf:NAME_OR_PATH), not {path}")
    p = Path(path).expanduser()
    if p.is_file():
        _not_a_table(p)
    from mimkit.data.shards import is_shard_source

    if is_shard_source(str(path)) and not str(path).startswith("pipe:") and "{" not in str(path):
        raise DataError(
            f"{path}: tar shards; an evaluation reads labelled shards through datasets: --data hf:{path} (labels from "
            "each sample's .cls member, or --label-column; docs/data.md)"
        )
    if not is_labelled_root(p):
        raise DataError(
            f"{p}: evaluation needs labels: an ImageFolder root with train/<class>/ images "
            "(and val/<class>/, or a held-out split is made from train/)."
        )
    train = _require_images(_class_folder_list(p / "train"), p / "train")
    if (p / "val").is_dir():
        return train, _require_images(_class_folder_list(p / "val", train.classes), p / "val")
    import random

    rng = random.Random(seed)
    split: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], [])}
    by_class: dict[int, list[str]] = {}
    assert train.labels is not None  # a class-folder list has labels
    for path_, label in zip(train.paths, train.labels):
        by_class.setdefault(int(label), []).append(path_)
    for label, items in sorted(by_class.items()):
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        for i, item in enumerate(items):
            paths, labels = split["val" if i < n_val else "train"]
            paths.append(item)
            labels.append(label)
    tr = ImageList(*split["train"], train.classes, train.root)
    va = ImageList(*split["val"], train.classes, train.root + " (held out)")
    return tr, va
