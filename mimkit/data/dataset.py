"""Datasets that never die on a bad image: it is replaced by another one and reported with the batch."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mimkit.data.decode import BadImage, load_image
from mimkit.data.sources import DataError, ImageList

MAX_REPLACEMENT_TRIES = 64


class ImageDataset(Dataset):
    """Returns ``{"image": tensor, "label": int, "index": int, "skipped": [(path, reason), ...]}``.

    An unreadable, truncated or too-small image is replaced by the next readable one (deterministically, so the
    batch shape never changes) and listed in ``skipped`` so the trainer can count and log it.

    With ``seed`` set, the random augmentation of a sample depends only on (seed, epoch, index): the same in any
    worker process and after a resume, which makes a resumed run continue exactly.

    ``in_chans`` 3 reads every image as 8-bit RGB; any other value reads images at full precision with exactly that
    many channels (``mimkit.data.decode.load_image``); an image with another channel count is skipped like a bad one.

    ``replace_bad=False`` (evaluations, which must score each image once): a bad image is not replaced; its sample has
    ``image`` None, and ``collate`` leaves it out of the batch (its ``skipped`` entry stays).
    """

    def __init__(
        self,
        images: ImageList,
        transform: Callable,
        min_image_size: int = 8,
        seed: int | None = None,
        in_chans: int = 3,
        replace_bad: bool = True,
    ):
        self.images = images
        self.replace_bad = replace_bad
        self.in_chans = in_chans
        self.transform = transform
        self.min_image_size = min_image_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch passed to every sample (``batch["epoch"]``) and to seeded augmentations."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if self.seed is None:
            return self._load(index)
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return self._load(index)

    def _load(self, index: int) -> dict:
        skipped = []
        n = len(self.images)
        for attempt in range(min(n, MAX_REPLACEMENT_TRIES) if self.replace_bad else 1):
            i = (index + attempt * 7919) % n  # a prime stride spreads replacements over the dataset
            path = self.images.paths[i]
            try:
                img = load_image(path, self.min_image_size, self.in_chans)
            except BadImage as err:
                skipped.append((path, str(err)))
                continue
            try:
                image = self.transform(img)
            except Exception as err:  # a rare augmentation failure must not end a long run; 64 in a row still do
                skipped.append((path, f"transform failed: {type(err).__name__}: {err}"))
                continue
            label = int(self.images.labels[i]) if self.images.labels is not None else -1
            return {"image": image, "label": label, "index": i, "skipped": skipped}
        if not self.replace_bad:
            return {"image": None, "label": -1, "index": index, "skipped": skipped}
        raise DataError(
            f"{self.images.root}: {len(skipped)} images in a row could not be read "
            f"(last: {skipped[-1][0]}: {skipped[-1][1]}); is this really an image dataset?"
        )


def sample_seed(seed: int, epoch: int, index: int | str) -> int:
    """A 63-bit seed from (seed, epoch, index or a sample's name), independent of the process that asks."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int):
    """Seed torch's, Python's and numpy's global generators (all that torchvision and timm transforms use), and
    restore their states afterwards so that the caller's random streams are untouched."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def collate(samples: list[dict]) -> dict:
    """Stack images/labels/indices; concatenate the lists of skipped files. Samples without an image (a bad one left
    unreplaced, ``ImageDataset(replace_bad=False)``) are left out; a batch of none has no ``image`` and empty
    ``label`` and ``index``."""
    skipped = [s for sample in samples for s in sample["skipped"]]
    kept = [{k: v for k, v in s.items() if k != "skipped"} for s in samples if s["image"] is not None]
    if kept:
        batch = default_collate(kept)
    else:
        batch = {"label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long)}
    batch["skipped"] = skipped
    return batch


def synthetic_batch(batch_size: int, img_size: int, device="cpu", seed: int = 0, in_chans: int = 3) -> dict:
    """A seeded random batch (images and zero labels) for benchmarks and smoke tests."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, in_chans, img_size, img_size, generator=g)
    return {"image": images.to(device), "label": torch.zeros(batch_size, dtype=torch.long, device=device)}
