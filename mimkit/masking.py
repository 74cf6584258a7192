"""Mask generators. Each is a pure function of (shape, ratio, generator): same generator state, same mask.

Convention everywhere: ``mask`` is 1 where a patch is removed / to be predicted and 0 where it is visible.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class MaskDraw(NamedTuple):
    ids_keep: torch.Tensor     # (N, len_keep) indices of visible patches (in shuffled order)
    ids_restore: torch.Tensor  # (N, L) inverse permutation: unshuffles [visible, masked] back to raster order
    mask: torch.Tensor         # (N, L) float, 1 = masked, raster order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's count: int(L * (1 - ratio)), at least one patch kept."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> MaskDraw:
    """Keep the ``len_keep`` lowest-noise patches of every row of ``noise`` (N, L)."""
    n, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskDraw(ids_keep, ids_restore, mask)


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None) -> MaskDraw:
    """MAE per-sample random masking: argsort of i.i.d. uniform noise, keep int(L * (1 - ratio))."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return masking_from_noise(noise, num_visible(num_patches, mask_ratio))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
