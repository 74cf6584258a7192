"""Patch merging: halve an NHWC map's resolution, two ways."""

from __future__ import annotations

import torch
from torch import nn


class PatchMerge(nn.Module):
    """LayerNorm then Conv2d(kernel 2, stride 2): halves the resolution (UM-MAE's Swin)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.reduction = nn.Conv2d(in_dim, out_dim, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenated -> LayerNorm -> Linear(4C -> out) (Swin v1, MixMAE, DyViT)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))
