"""The pre-norm transformer block every pyramid uses: x + attend(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from mimkit.models.layers.mlp import Mlp


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over ``blocks`` blocks (timm's rule). Computed on the
    CPU whatever the default device, so that a model also builds under ``torch.device("meta")`` (FSDP's
    per-shard materialisation, mimkit/engine/fsdp.py)."""
    return torch.linspace(0, rate, blocks, device="cpu").tolist()


class PreNormBlock(nn.Module):
    """``norm1``, ``attn``, ``norm2``, ``mlp``, ``drop_path`` (timm's names, so state dicts keep their keys). The
    attention module is the backbone's own; a subclass that must reshape around it (windows, shifts) overrides
    :meth:`attend`, which by default calls ``attn(y, *args)``."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, y: torch.Tensor, *args) -> torch.Tensor:
        """The attention on the normed input (same shape out)."""
        return self.attn(y, *args)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        x = x + self.drop_path(self.attend(self.norm1(x), *args))
        return x + self.drop_path(self.mlp(self.norm2(x)))
