"""Relative positions inside windows: the index into a learned (2W-1)^2 table (MixMAE's Swin, DyViT) and the
continuous bias from an MLP over log-spaced true offsets (UM-MAE's Swin)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

COORD_UNITS = 2  # continuous-bias coordinates are multiples of 1/2 token of the current stage


LOOKUPS = ("embedding", "index_add", "index")


class _RowsByIndexAdd(torch.autograd.Function):
    """``table[index]`` gathered from the (heads, rows) transpose, with an ``index_add_`` backward (``bias_rows``)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.t()[:, index].movedim(0, -1)  # values of table[index], stored (heads, *index.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        g = grad.movedim(-1, 0).reshape(grad.shape[-1], -1)  # (heads, n): a view when grad is stored heads first
        out = torch.zeros(g.shape[0], ctx.rows, dtype=g.dtype, device=g.device)
        out.index_add_(1, index.reshape(-1), g)
        # in the table's own (rows, heads) layout, strides included (DDP compares them; one head: (1, 1), not (1, rows))
        return (out.view(ctx.rows, 1) if out.shape[0] == 1 else out.t().contiguous()), None


def bias_rows(table: torch.Tensor, index: torch.Tensor, lookup: str | None = None) -> torch.Tensor:
    """``table[index]``: rows of a (rows, heads) bias table, shape index.shape + (heads,). Three ways to the same
    values, which differ in their backward (the sum of each row's duplicates: a bias index holds a few hundred
    distinct rows repeated millions of times, batch x windows x T x T):

    - ``"embedding"`` (default on CUDA): ``F.embedding``, whose backward sums a row's duplicates in parallel segments.
      Advanced indexing's accumulating ``index_put`` sorts the indices and adds the duplicates of a row one after
      another; on an H200 that one kernel took 64 % of UM-MAE Swin-T's step (42 of 65 ms at batch 64, bf16;
      docs/benchmarks.md, "On a GPU").
    - ``"index_add"`` (default on the CPU): gathered from the (heads, rows) transpose, backward ``index_add_`` along
      its rows (the gradient laid out (heads, n), one copy): a vectorised pass per head instead of ``index_put``'s
      element loop, about 4x faster forward and backward on 2 cores for UM-MAE Swin-T's per-image indices
      (``scripts/gather_backward.py``, docs/benchmarks/gather_backward_cpu.txt); embedding's backward is 2.6x slower
      than ``index_put`` there at 3 heads.
    - ``"index"``: plain ``table[index]``."""
    if lookup is None:
        lookup = "embedding" if table.is_cuda else "index_add"
    if lookup == "embedding":
        return F.embedding(index, table)
    if lookup == "index_add":
        return _RowsByIndexAdd.apply(table, index)
    if lookup == "index":
        return table[index]
    raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")


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
