"""Patchify / unpatchify and the reconstruction losses shared by the MIM methods (docs/methods.md 1.1, 1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)(W/p), p*p*C); patches row-major, inside a patch (row, col, channel)."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def patchify_channels_first(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)(W/p), C*p*p), inside a patch (channel, row, col): the layout of a p x p conv kernel,
    so ``F.linear(patches, conv.weight.flatten(1), conv.bias)`` equals the stride-p convolution on each patch."""
    n, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    return imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)


def is_patchwise(conv) -> bool:
    """Whether ``conv`` maps every non-overlapping patch on its own as one linear map: an ``nn.Conv2d`` whose kernel
    is its stride, with no padding, dilation or groups; then embedding some patches of an image equals ``F.linear``
    on their pixels (``patchify_channels_first`` for a square kernel, ``mimkit.models.layers.patch_linear`` on an
    NHWC map), and the kept patches can be embedded alone."""
    from torch import nn

    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == conv.stride
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``; ``grid`` (rows, cols) defaults to a square grid."""
    n, length, _ = x.shape
    if grid is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise ValueError(f"{length} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(n, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, h * p, w * p)


def normalized_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalization of targets: (t - mean) / sqrt(var + eps), unbiased var (MAE's norm_pix_loss).

    Computed as a layer norm without affine (one fused pass; the mean-and-``var`` form took 6.9x as long on CPU-3
    for a batch of targets, docs/benchmarks.md, "Row gathers"): with D values per patch, unbiased var = biased var
    * D / (D - 1), so the same value is ``layer_norm(t, eps * (D - 1) / D) * sqrt((D - 1) / D)``."""
    d = patches.shape[-1]
    if d < 2:  # no unbiased variance of one value: the plain formula (nan, as before)
        mean = patches.mean(dim=-1, keepdim=True)
        return (patches - mean) / (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return F.layer_norm(patches, (d,), eps=eps * (d - 1) / d) * ((d - 1) / d) ** 0.5


def patch_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over each patch's values, in fp32: (..., L, D) -> (..., L)."""
    return ((pred.float() - target.float()) ** 2).mean(dim=-1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE averaged over patch dims, then over patches where mask == 1."""
    return (patch_mse(pred, target) * mask).sum() / mask.sum().clamp(min=1)
