"""Image transforms: MAE pretraining augmentation, evaluation resize/crop, and dataset statistics."""

from __future__ import annotations

import random

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(
    img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5
) -> T.Compose:
    """MAE augmentation: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, ToTensor, Normalize."""
    steps = [
        T.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=InterpolationMode.BICUBIC)
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875) -> T.Compose:
    """Resize the shorter side to img_size / crop_pct, then center-crop img_size (the 256/224 convention)."""
    return T.Compose(
        [
            T.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def compute_mean_std(paths: list[str], max_images: int = 2000, size: int = 64, seed: int = 0):
    """Per-channel mean and std of ``paths`` (a seeded sample of at most ``max_images``, each resized to size px)."""
    from mimkit.data.decode import BadImage, load_rgb

    rng = random.Random(seed)
    sample = paths if len(paths) <= max_images else rng.sample(paths, max_images)
    to_tensor = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for p in sample:
        try:
            x = to_tensor(load_rgb(p)).double().flatten(1)
        except BadImage:
            continue
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        from mimkit.errors import DataError

        raise DataError("--compute-mean-std: none of the sampled images could be read")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
