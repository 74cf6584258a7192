"""Data loading for training: distributed sampling, resumable mid-epoch, seeded per epoch."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from mimkit.data import collate
from mimkit.engine.signals import ignore_stop_signals


class ResumableSampler(Sampler[int]):
    """``DistributedSampler`` whose epoch can start after the first ``skip`` samples (mid-epoch resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        self.inner: DistributedSampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch's seeded order, skipping the first ``skip`` samples of this rank (resume)."""
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def _seed_worker(worker_id: int) -> None:
    ignore_stop_signals()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def default_workers(
    device: torch.device, local_world_size: int, cpus: int | None = None, node_cpus: int | None = None
) -> int:
    """Loader workers per rank: on GPU up to 10 of the CPUs each rank can have, on CPU 1 (0 on one core).

    ``cpus``: the CPUs this process may run on (its affinity); ``node_cpus``: the machine's. Where every rank may
    run on the same CPUs (torchrun, plain srun) each gets a 1/``local_world_size`` share of them; where the scheduler
    gave each task its own CPUs (``srun --cpus-per-task``: the affinity is at most a rank's share of the node) they
    are the rank's already, and dividing them again left one worker per GPU."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    node_cpus = node_cpus or os.cpu_count() or cpus
    ranks = max(1, local_world_size)
    if device.type == "cuda":
        own = cpus if cpus * ranks <= node_cpus else cpus // ranks
        return max(1, min(10, own - 1))
    return 1 if cpus > 1 else 0


def build_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    sampler: ResumableSampler | None,
    device: torch.device,
    epoch_seed: int,
) -> DataLoader:
    """One epoch's loader (a map-style dataset with its sampler, or an iterable one with ``sampler=None``). It has its
    own generator: drawing worker seeds from the global one would shift the masks after a resume."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(epoch_seed),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class MapEpochs:
    """A map-style dataset: a seeded distributed sampler that can start mid-epoch."""

    def __init__(self, dataset, batch_size: int, num_workers: int, rank: int, world: int, seed: int):
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.sampler = ResumableSampler(dataset, world, rank, seed)

    def batches_per_epoch(self) -> int:
        """Batches each rank draws per epoch."""
        return len(self.sampler.inner) // self.batch_size

    def per_rank(self) -> int:
        """Samples each rank draws per epoch."""
        return len(self.sampler.inner)

    def loader(self, epoch: int, skip_batches: int, device: torch.device) -> DataLoader:
        """A loader for ``epoch`` that skips the first ``skip_batches`` batches (exact mid-epoch resume)."""
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return build_loader(
            self.dataset, self.batch_size, self.num_workers, self.sampler, device, self.seed * 100003 + epoch
        )


class StreamEpochs:
    """An iterable dataset with a fixed plan (``dataset.plan``): tar shards (``mimkit/data/shards.py``)."""

    def __init__(self, dataset, batch_size: int, num_workers: int, rank: int, world: int, seed: int):
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.batches = dataset.plan(rank, world, max(1, num_workers), batch_size)

    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (equal on every rank)."""
        return self.batches

    def per_rank(self) -> int:
        """Samples each rank yields per epoch."""
        return self.batches * self.batch_size

    def loader(self, epoch: int, skip_batches: int, device: torch.device) -> DataLoader:
        """A loader over the stream for ``epoch``, skipping ``skip_batches`` of this rank's batches."""
        self.dataset.set_epoch(epoch, skip_batches)
        return build_loader(self.dataset, self.batch_size, self.num_workers, None, device, self.seed * 100003 + epoch)


def epoch_data(dataset, batch_size: int, num_workers: int, rank: int, world: int, seed: int):
    """How the trainer draws an epoch's batches from ``dataset`` (map-style or streaming)."""
    cls = StreamEpochs if isinstance(dataset, IterableDataset) else MapEpochs
    return cls(dataset, batch_size, num_workers, rank, world, seed)
