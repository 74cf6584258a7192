"""Patch merging: halve an NHWC map's resolution, two ways."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.patches import is_patchwise


def patch_linear(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (a Conv2d whose stride equals its kernel, no padding) applied to an NHWC map, returning NHWC: the
    non-overlapping patches gathered channel-last and one matrix product, the result of
    ``conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)`` without the round trip through NCHW (faster forward and backward
    on a CPU, docs/benchmarks.md). The module keeps its Conv2d weights and state-dict keys."""
    out_dim, in_dim, kh, kw = conv.weight.shape
    if not is_patchwise(conv):
        raise ValueError(
            f"patch_linear needs a Conv2d whose stride equals its kernel ({kh}x{kw}), without padding, dilation or "
            f"groups; got stride {conv.stride}, padding {conv.padding}, dilation {conv.dilation}, groups {conv.groups}"
        )
    b, h, w, c = x.shape
    if h % kh or w % kw:
        raise ValueError(f"patch_linear: a {h}x{w} map does not split into {kh}x{kw} patches")
    if (kh, kw) == (1, 1):  # a view whose gradient has the weight's own strides (DDP checks them; PVT's reductions)
        return F.linear(x, conv.weight.flatten(1), conv.bias)
    x = x.view(b, h // kh, kh, w // kw, kw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // kh, w // kw, kh * kw * c)
    return F.linear(x, conv.weight.permute(0, 2, 3, 1).reshape(out_dim, kh * kw * in_dim), conv.bias)


class PatchMerge(nn.Module):
    """LayerNorm then Conv2d(kernel 2, stride 2): halves the resolution (UM-MAE's Swin)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.reduction = nn.Conv2d(in_dim, out_dim, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_linear(self.norm(x), self.reduction)


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
