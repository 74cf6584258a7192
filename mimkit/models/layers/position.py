"""Relative positions inside windows: the index into a learned (2W-1)^2 table (MixMAE's Swin, DyViT) and the
continuous bias from an MLP over log-spaced true offsets (UM-MAE's Swin)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

COORD_UNITS = 2  # continuous-bias coordinates are multiples of 1/2 token of the current stage


def bias_rows(table: torch.Tensor, index: torch.Tensor, embedding: bool | None = None) -> torch.Tensor:
    """``table[index]`` (rows of a (rows, heads) bias table, shape index.shape + (heads,)); on CUDA through
    ``F.embedding``.

    The values are the same; the backward is not. Advanced indexing's backward is an accumulating ``index_put``
    whose CUDA kernel sorts the indices and then adds the duplicates of each row one after another; a bias index holds
    a few hundred distinct rows repeated millions of times (batch x windows x T x T), so on an H200 that one kernel
    took 64 % of UM-MAE Swin-T's step (42 of 65 ms at batch 64, bf16; docs/benchmarks.md, "On a GPU").
    ``embedding``'s backward sums the duplicates of a row in parallel segments. On the CPU it is the other way round
    (embedding's backward 2-3x slower on 2 cores, ``scripts/gather_backward.py``), so the CPU keeps the indexing.
    ``embedding`` forces one way (None: embedding on CUDA)."""
    if embedding is None:
        embedding = table.is_cuda
    return F.embedding(index, table) if embedding else table[index]


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
