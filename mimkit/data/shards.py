"""WebDataset tar shards: a folder of ``.tar`` files, a brace pattern (``train-{000000..000127}.tar``), one ``.tar``
file, or ``pipe:COMMAND`` URLs (object stores through their own CLI). Tar reading is webdataset's; the epoch plan,
the shuffle, decoding and the resume are mimkit's (docs/data.md).

Epoch plan. Shards are assigned once to (rank, worker) slots, balanced by sample count; each epoch reshuffles the order
of every slot's shards and passes its samples through a seeded shuffle buffer. Every rank runs the same number of
batches (the smallest any rank can fill), so no rank waits for another at the end of an epoch; the samples past that
are dropped for the epoch, like ``drop_last``. No sample is read twice in an epoch.

Resume. A worker's stream is a pure function of (seed, epoch, rank, worker); a mid-epoch resume skips, before
decoding, the samples each worker had delivered in the batches already trained on, so the resumed run sees exactly
the samples and augmentations an uninterrupted run would.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from mimkit.data.dataset import sample_seed, seeded
from mimkit.data.decode import BadImage, load_image
from mimkit.errors import DataError

INDEX_NAME = "mimkit-shards.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def is_shard_source(data: str) -> bool:
    """``--data`` names shards: a pipe: URL, a brace pattern or a .tar file, or a folder that holds .tar files."""
    text = str(data)
    if text.startswith("pipe:") or ("{" in text and ".tar" in text) or text.endswith(".tar"):
        return True
    p = Path(text).expanduser()
    return p.is_dir() and any(p.glob("*.tar")) and not (p / "train").is_dir()


@dataclass
class ShardList:
    """Shard URLs with their sample counts (the ``images`` a shard source gives the trainer)."""

    urls: list[str]
    counts: list[int]
    root: str
    ignored: dict | None = None

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def paths(self) -> list:
        """Up to 1,000 image files (in memory) from the first shards, for ``--compute-mean-std``."""
        from webdataset.tariterators import tarfile_samples

        files = []
        for sample in tarfile_samples(({"url": u} for u in self.urls), handler=lambda err: True):
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is not None:
                files.append(io.BytesIO(data))
            if len(files) >= 1000:
                break
        return files


def _count_members(url: str) -> int:
    keys = set()
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isfile():
                base = os.path.basename(member.name)
                keys.add((os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def _shard_name(url: str) -> str:
    """The shard's file name in a path or a pipe: command (its last ``*.tar`` token)."""
    import re

    found = re.findall(r"([^/\s'\"]+\.tar)", url)
    return found[-1] if found else os.path.basename(url)


def find_shards(data: str, index_file: str = "") -> ShardList:
    """Resolve ``--data`` into shard URLs and counts: from ``mimkit-shards.json`` (written by ``mimkit shards``; next
    to local shards, or ``index_file``, matched by shard file name) when present, else by reading the tar headers of
    local shards; ``pipe:`` sources need the index."""
    from webdataset.shardlists import expand_urls

    text = str(data)
    p = Path(text).expanduser()
    if index_file:
        index_path = Path(index_file).expanduser()
        if not index_path.is_file():
            raise DataError(f"--shard-index {index_file}: no such file")
    else:
        index_path = (p / INDEX_NAME) if p.is_dir() else (Path(text.split("{")[0]).parent / INDEX_NAME)
    if p.is_dir():
        urls = sorted(str(u) for u in p.glob("*.tar"))
    else:
        urls = list(expand_urls(text))
    if not urls:
        raise DataError(f"{text}: no .tar shards found")
    index = {}
    if index_path.is_file():
        try:
            entries = json.loads(index_path.read_text())["shards"]
            index = {str(e["name"]): int(e["count"]) for e in entries}
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{index_path}: not a mimkit shard index ({err}); rewrite it with `mimkit shards`"
            ) from None
    counts = []
    for url in urls:
        if _shard_name(url) in index:
            counts.append(index[_shard_name(url)])
        elif url.startswith("pipe:"):
            raise DataError(
                f"{url}: the sample count of a pipe: shard is unknown; give the {INDEX_NAME} that "
                "`mimkit shards` wrote with --shard-index FILE"
            )
        else:
            try:
                counts.append(_count_members(url))
            except (OSError, tarfile.TarError) as err:
                raise DataError(f"{url}: not a readable tar shard ({err})") from None
    if sum(counts) == 0:
        raise DataError(f"{text}: the shards hold no samples")
    return ShardList(urls, counts, text)


def assign_slots(counts: list[int], slots: int) -> list[list[int]]:
    """Shard indices per slot, balanced by sample count (largest first onto the lightest slot; deterministic)."""
    bins: list[list[int]] = [[] for _ in range(slots)]
    load = [0] * slots
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        j = min(range(slots), key=lambda j: (load[j], j))
        bins[j].append(i)
        load[j] += counts[i]
    return bins


class ShardDataset(IterableDataset):
    """Decoded, augmented samples from tar shards: ``{"image", "label": -1, "index", "skipped"}`` like
    ``ImageDataset``. Call ``plan(rank, world, workers, batch_size)`` once and ``set_epoch(epoch, skip_batches)``
    before each epoch's iterator."""

    def __init__(
        self,
        shards: ShardList,
        transform,
        min_image_size: int = 8,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        in_chans: int = 3,
    ):
        self.shards = shards
        self.in_chans = in_chans
        self.transform = transform
        self.min_image_size = min_image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.skip_batches = 0, 0
        self.rank, self.world, self.workers, self.batch_size = 0, 1, 1, 1

    def __len__(self) -> int:
        return len(self.shards)

    def plan(self, rank: int, world: int, workers: int, batch_size: int) -> int:
        """Fix the slots; returns the batches every rank runs per epoch."""
        self.rank, self.world, self.workers, self.batch_size = rank, world, max(1, workers), batch_size
        self.slots = assign_slots(self.shards.counts, world * self.workers)
        per_rank = []
        for r in range(world):
            per_rank.append(
                sum(
                    sum(self.shards.counts[i] for i in self.slots[r * self.workers + w]) // batch_size
                    for w in range(self.workers)
                )
            )
        self.batches = min(per_rank)
        return self.batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch to read (its seeded shard order) and how many of this rank's batches to skip (resume)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw_samples(self, worker: int, repeat: int = 0):
        from webdataset.tariterators import tarfile_samples

        shard_ids = list(self.slots[self.rank * self.workers + worker])
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:{repeat}")
        rng.shuffle(shard_ids)
        errors: list[str] = []

        def handler(err: Exception) -> bool:
            errors.append(f"{type(err).__name__}: {err}")
            return True  # skip the damaged member or shard, go on

        src = ({"url": self.shards.urls[i]} for i in shard_ids)
        buffer: list[dict] = []
        for sample in tarfile_samples(src, handler=handler):
            while errors:
                yield {"__error__": errors.pop(0)}
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer
        for err in errors:
            yield {"__error__": err}

    def _decode(self, sample: dict, key: str):
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise BadImage(f"no image member ({', '.join(k for k in sample if not k.startswith('__'))})")
        img = load_image(io.BytesIO(data), self.min_image_size, self.in_chans)
        with seeded(sample_seed(self.seed, self.epoch, key)):
            return self.transform(img)

    def __iter__(self):
        from mimkit.engine.signals import ignore_stop_signals

        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            ignore_stop_signals()
        # The loader takes one batch from each worker in turn, starting with worker 0; the epoch's batch k belongs
        # to role k % workers. After a resume at batch k0, worker w plays role (w + k0) % workers, so that the
        # batches keep their order.
        role = (worker + self.skip_batches) % self.workers
        wanted = len(range(role, self.batches, self.workers)) * self.batch_size
        skip = len(range(role, self.skip_batches, self.workers)) * self.batch_size
        delivered, skipped, repeat = 0, [], 0
        while delivered < wanted:  # damaged members leave a worker short: it tops up from its shards' start
            readable = 0
            for sample in self._raw_samples(role, repeat):
                if delivered >= wanted:
                    return
                if "__error__" in sample:
                    skipped.append((f"{self.shards.root} (a shard)", sample["__error__"]))
                    continue
                key = f"{sample.get('__url__', '')}/{sample.get('__key__', '')}"
                if delivered < skip:  # already trained on: skipped without decoding (docs/data.md)
                    delivered += 1
                    readable += 1
                    continue
                try:
                    image = self._decode(sample, key)
                except BadImage as err:
                    skipped.append((key, str(err)))
                    continue
                except Exception as err:  # a transform that fails on one image
                    skipped.append((key, f"transform failed: {type(err).__name__}: {err}"))
                    continue
                delivered += 1
                readable += 1
                index = sample_seed(0, 0, key) % 2**62  # stable per sample (CoMA keys its masks on it)
                yield {"image": image, "label": -1, "index": index, "skipped": skipped}
                skipped = []
            if readable == 0:
                raise DataError(
                    f"{self.shards.root}: rank {self.rank} worker {worker} read no usable sample from "
                    f"its shards (last problem: {skipped[-1][1] if skipped else 'none'})"
                )
            repeat += 1
