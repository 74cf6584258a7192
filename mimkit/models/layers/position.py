"""Relative positions inside windows: the index into a learned (2W-1)^2 table (MixMAE's Swin, DyViT) and the
continuous bias from an MLP over log-spaced true offsets (UM-MAE's Swin)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

COORD_UNITS = 2  # continuous-bias coordinates are multiples of 1/2 token of the current stage


@functools.lru_cache(maxsize=64)
def relative_index(wh: int, ww: int, table_window: int, device=None) -> torch.Tensor:
    """(T, T) indices into a ((2W-1)^2)-row bias table for a wh x ww window (wh, ww <= W). Cached per shape and
    device: every block of every forward asks for the same few (read-only) index tensors."""
    r, c = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    coords = torch.stack([r.flatten(), c.flatten()])  # (2, T)
    rel = coords[:, :, None] - coords[:, None, :] + table_window - 1
    return rel[0] * (2 * table_window - 1) + rel[1]


def log_spaced(d: torch.Tensor) -> torch.Tensor:
    """sign(d) * log(1 + |d|): the coordinate transform of the continuous position bias."""
    return torch.sign(d) * torch.log1p(d.abs())


class PositionBiasMLP(nn.Module):
    """Continuous relative position bias: (dy, dx) -> log-spaced -> Linear -> ReLU -> Linear -> one value per head."""

    def __init__(self, num_heads: int, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, num_heads)

    def table(self, radius: int, device) -> torch.Tensor:
        """Bias for every offset in [-radius, radius]^2 (in 1/COORD_UNITS steps): ((2R+1)^2, heads)."""
        d = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32) / COORD_UNITS
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        return self.fc2(F.relu(self.fc1(log_spaced(torch.stack([dy, dx], -1).view(-1, 2)))))
