"""Window partition and its inverse on NHWC maps, and attention inside windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, wh*ww, C), windows in raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B, nW, wh*ww, C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    x = x.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention in every window: ``q``, ``k``, ``v`` (B, nW, heads, T, d), ``bias`` additive and
    broadcastable to (B, nW, heads, T, T) (relative positions, shift and key masks); returns (B, nW, heads, T, d).

    Windows are folded into the batch (a view of q, k, v) so that the call is 4-D: PyTorch's fused attention kernels
    (flash and memory-efficient on GPU, flash on CPU) take only 4-D inputs, and a 5-D call runs the unfused math path,
    which on GPU also computes bf16 inputs in fp32. A bias shared by the images is expanded to the batch (a copy of
    the size of the attention scores that the unfused path would write anyway)."""
    b, nw, h, t, d = q.shape
    bias = bias.to(q.dtype)
    bias = bias.reshape((1,) * (5 - bias.dim()) + bias.shape).expand(b, nw, h, t, t).reshape(b * nw, h, t, t)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn_mask=bias)
    return out.view(b, nw, h, t, d)
