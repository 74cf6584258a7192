"""Find images: a labelled ImageFolder root, any folder tree of unlabelled images, or a text file listing paths."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mimkit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageList", "find_images", "labelled_splits", "scan_tree"]


@dataclass
class ImageList:
    """Image paths with optional integer labels (``labels`` is None for unlabelled data)."""

    paths: list[str]
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    root: str = ""
    ignored: dict[str, int] = field(default_factory=dict)  # files skipped for an unsupported type, by extension

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_tree(root: Path, ignored: Counter | None = None) -> list[str]:
    """All image files below ``root`` (recursive, sorted, hidden folders skipped, symlinked folders followed).

    Each real folder is visited once and each real file listed once, so symlink loops and links to folders already
    seen add nothing. Other files are counted by extension in ``ignored`` when given."""
    found, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen_dirs
        )
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            path = os.path.join(dirpath, f)
            if not _is_image(f):
                if ignored is not None:
                    ignored[os.path.splitext(f)[1].lower()] += 1
                continue
            real_file = os.path.realpath(path)
            if real_file not in seen_files:
                seen_files.add(real_file)
                found.append(path)
    return found


def read_file_list(list_file: Path) -> list[str]:
    """One image path per line; blank lines and ``#`` comments ignored; relative paths are relative to the list file."""
    if list_file.name.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(
            f"{list_file}: is an image, not a folder or a list of images. Point --data at the folder "
            "that holds it, or at a text file listing image paths."
        )
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


def _class_folder_list(split_dir: Path, classes: list[str] | None = None) -> ImageList:
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
        for p in scan_tree(split_dir / c, ignored):
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
    p = Path(path)
    return p.is_dir() and (p / "train").is_dir()


def find_images(path: str | os.PathLike, split: str = "train") -> ImageList:
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
        return _require_images(ImageList(read_file_list(p), root=str(p)), p)
    if is_labelled_root(p):
        split_dir = p / split
        if not split_dir.is_dir():
            raise DataError(f"{p}: has no {split}/ folder")
        return _require_images(_class_folder_list(split_dir), split_dir)
    ignored: Counter = Counter()
    images = ImageList(scan_tree(p, ignored), root=str(p), ignored=dict(ignored))
    return _require_images(images, p)


def labelled_splits(path: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageList, ImageList]:
    """Train and val splits with labels, for kNN and other evaluations.

    Needs an ImageFolder root: ``train/<class>/*`` and ideally ``val/<class>/*``. Without ``val/`` a fixed, seeded
    ``val_fraction`` of every class is held out.
    """
    p = Path(path).expanduser()
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
    tr, va = ImageList([], [], train.classes, train.root), ImageList([], [], train.classes, train.root + " (held out)")
    by_class: dict[int, list[str]] = {}
    for path_, label in zip(train.paths, train.labels):
        by_class.setdefault(label, []).append(path_)
    for label, items in sorted(by_class.items()):
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        for i, item in enumerate(items):
            target = va if i < n_val else tr
            target.paths.append(item)
            target.labels.append(label)
    return tr, va
