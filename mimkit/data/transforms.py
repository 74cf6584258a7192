"""Image transforms: MAE pretraining augmentation, evaluation resize/crop, and dataset statistics."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToFloatTensor:
    """PIL images to (C, H, W) floats in [0, 1] (``ToTensor``); tensors (already full-precision floats from
    ``load_array``) pass unchanged. Every transform here works on both."""

    def __call__(self, img):
        return img if isinstance(img, torch.Tensor) else T.functional.to_tensor(img)

    def __repr__(self) -> str:
        return "ToFloatTensor()"


def pretrain_transform(
    img_size: int | Sequence[int],
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> T.Compose:
    """MAE augmentation: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, ToTensor, Normalize. Takes a PIL
    image or a float tensor (C, H, W) of any channel count."""
    size = img_size if isinstance(img_size, int) else tuple(img_size)  # (height, width) for rectangles
    if not isinstance(size, int):  # crop aspect ratios around the output's (width / height), not around square
        ratio = (ratio[0] * size[1] / size[0], ratio[1] * size[1] / size[0])
    steps = [T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), interpolation=InterpolationMode.BICUBIC)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(steps + [ToFloatTensor(), T.Normalize(mean, std)])


def eval_transform(
    img_size: int | Sequence[int], mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875
) -> T.Compose:
    """Resize the shorter side to img_size / crop_pct, then center-crop img_size (the 256/224 convention); for a
    (height, width) size, the shorter side goes to the longer of the two / crop_pct."""
    side = img_size if isinstance(img_size, int) else max(img_size)
    crop = img_size if isinstance(img_size, int) else tuple(img_size)
    return T.Compose(
        [
            T.Resize(int(round(side / crop_pct)), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            ToFloatTensor(),
            T.Normalize(mean, std),
        ]
    )


def compute_mean_std(paths, max_images: int = 2000, size: int = 64, seed: int = 0, in_chans: int = 3):
    """Per-channel mean and std of ``paths`` (a seeded sample of at most ``max_images``, each resized to size px), in
    the units the model sees (``load_image``: [0, 1] for integer images)."""
    from mimkit.data.decode import BadImage, load_image

    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(paths)), max_images)) if len(paths) > max_images else range(len(paths))
    to_tensor = T.Compose(
        [T.Resize(size, interpolation=InterpolationMode.BILINEAR), T.CenterCrop(size), ToFloatTensor()]
    )
    total = torch.zeros(in_chans, dtype=torch.float64)
    total_sq = torch.zeros(in_chans, dtype=torch.float64)
    count, last = 0, ""
    for i in picked:
        try:
            x = to_tensor(load_image(paths[i], 1, in_chans)).double().flatten(1)
        except BadImage as err:
            last = f"; last: {paths[i] if isinstance(paths[i], str) else 'a shard member'}: {err}"
            continue
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        from mimkit.errors import DataError

        raise DataError(f"--compute-mean-std: none of the {len(picked)} sampled images could be read{last}")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
