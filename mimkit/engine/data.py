"""Data loading for training: distributed sampling, resumable mid-epoch, seeded per epoch."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from mimkit.data import ImageDataset, collate
from mimkit.data.sources import DataError
from mimkit.engine.signals import ignore_stop_signals


class ResumableSampler(Sampler[int]):
    """``DistributedSampler`` whose epoch can start after the first ``skip`` samples (mid-epoch resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        self.inner: DistributedSampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
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


def default_workers(device: torch.device, local_world_size: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(10, cpus // max(1, local_world_size) - 1))
    return 1 if cpus > 1 else 0


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int,
    sampler: ResumableSampler,
    device: torch.device,
    epoch_seed: int,
) -> DataLoader:
    per_rank = len(sampler.inner)
    if per_rank < batch_size:
        raise DataError(
            f"{dataset.images.root}: {len(dataset)} images give {per_rank} per process, fewer than "
            f"one batch of {batch_size}. Lower --batch-size (or use fewer processes)."
        )
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
