"""Swin Transformer as UM-MAE uses it (docs/methods.md 4.4-4.5), with timm's model API.

- Relative position bias from a small MLP over log-spaced *true* coordinate differences (SwinV2-style continuous
  bias), so the same weights work on the full token grid and on UM-MAE's compact input, where neighbours in the
  compact map are not neighbours in the image.
- Patch merging is LayerNorm + Conv2d(2, 2); coordinates are subsampled and halved at every merge.
- A stage whose resolution fits in one window uses one global window without shift.
- ``forward_features(img)``: full resolution (fine-tuning, features). ``forward_compact(tokens, coords)``: UM-MAE
  pretraining on the compact map with half-size windows. ``encode_masked(img, mask, token)``: SimMIM.
"""

from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.masking import compact
from mimkit.models._pyramid import PyramidEncoder, create_pyramid, pyramid_cfg
from mimkit.models._size import canonical, pair, size_text
from mimkit.models.layers import (
    COORD_UNITS,
    PatchMerge,
    PositionBiasMLP,
    PreNormBlock,
    bias_rows,
    drop_path_rates,
    window_attention,
    window_partition,
    window_reverse,
)


class WindowLayout:
    """Windows, shift, relative-position indices and shift mask of one stage (shared by its blocks).

    ``coords`` (b, H, W, 2): true positions in the current stage's token units, for UM-MAE's compact map, where one
    window spans ``span`` = 2 true tokens per map token; ``None`` on the regular grid, where every window has the same
    relative positions, so one (1, 1, T, T) index serves all windows and images. The bias table's radius is fixed by
    the window and the span, not read from the data: no host synchronisation, static shapes for ``torch.compile``.
    Offsets beyond it occur only between the wrapped parts of a shifted window, which the shift mask hides; they are
    clamped to a valid row."""

    def __init__(self, h: int, w: int, window: int, shift: int, coords: torch.Tensor | None = None, span: int = 1,
                 device=None):  # fmt: skip
        self.h, self.w = h, w
        self.wh, self.ww = min(window, h), min(window, w)
        self.shift = shift if (h > window and w > window) else 0
        if h % self.wh or w % self.ww:
            raise ValueError(f"a {h}x{w} token map cannot be split into {self.wh}x{self.ww} windows")
        self.radius = COORD_UNITS * (span * max(self.wh, self.ww) - 1)
        if coords is None:
            units = grid_coords(self.wh, self.ww, device).view(1, 1, -1, 2).long() * COORD_UNITS  # (1, 1, T, 2)
        else:
            c = torch.roll(coords, (-self.shift, -self.shift), (1, 2)) if self.shift else coords
            units = torch.round(window_partition(c, self.wh, self.ww) * COORD_UNITS).long()  # (b, nW, T, 2)
        rel = (units[:, :, :, None, :] - units[:, :, None, :, :]).clamp(-self.radius, self.radius)
        side = 2 * self.radius + 1
        self.index = (rel[..., 0] + self.radius) * side + (rel[..., 1] + self.radius)  # (b|1, nW|1, T, T)
        self.mask = self._shift_mask(device) if self.shift else None

    def _shift_mask(self, device) -> torch.Tensor:
        region = torch.zeros(1, self.h, self.w, 1, device=device)
        bounds_h = ((0, self.h - self.wh), (self.h - self.wh, self.h - self.shift), (self.h - self.shift, self.h))
        bounds_w = ((0, self.w - self.ww), (self.w - self.ww, self.w - self.shift), (self.w - self.shift, self.w))
        label = 0
        for h0, h1 in bounds_h:
            for w0, w1 in bounds_w:
                region[:, h0:h1, w0:w1] = label
                label += 1
        rw = window_partition(region, self.wh, self.ww).squeeze(-1)  # (1, nW, T)
        same = rw[:, :, :, None] == rw[:, :, None, :]
        return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf")).unsqueeze(2)  # (1,nW,1,T,T)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with the continuous relative-position bias of a WindowLayout."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, pos_hidden: int = 32):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_mlp = PositionBiasMLP(num_heads, pos_hidden)

    def forward(self, x: torch.Tensor, layout: WindowLayout, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nw, t, c = x.shape
        qkv = self.qkv(x).view(b, nw, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = (u.transpose(2, 3) for u in qkv.unbind(3))  # the backward stacks into qkv's layout (SRAttention)
        bias = bias_rows(self.pos_mlp.table(layout.radius, x.device), layout.index)  # (b', nW, T, T, heads)
        bias = bias.permute(0, 1, 4, 2, 3)
        if layout.mask is not None:
            bias = bias + layout.mask
        if key_mask is not None:  # (b, nW, 1, 1, T) with -inf on keys to ignore (equivalence tests, analysis)
            bias = bias + key_mask
        out = window_attention(q, k, v, bias)
        return self.proj(out.transpose(2, 3).reshape(b, nw, t, c))


class SwinBlock(PreNormBlock):
    """Pre-norm Swin block: (shifted) window attention, then an MLP, on an NHWC map."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, shifted: bool, drop_path: float = 0.0, pos_hidden: int = 32
    ):
        super().__init__(dim, WindowAttention(dim, num_heads, pos_hidden=pos_hidden), mlp_ratio, drop_path)
        self.shifted = shifted

    def attend(self, y: torch.Tensor, layout: WindowLayout, key_mask_map: torch.Tensor | None = None):
        """Roll by the layout's shift, attend inside windows (keys masked where ``key_mask_map`` is -inf), roll
        back."""
        _, h, w, _ = y.shape
        s = layout.shift
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        key_mask = None
        if key_mask_map is not None:
            km = torch.roll(key_mask_map, (-s, -s), (1, 2)) if s else key_mask_map
            key_mask = window_partition(km.unsqueeze(-1), layout.wh, layout.ww).squeeze(-1)[:, :, None, None, :]
        y = window_reverse(
            self.attn(window_partition(y, layout.wh, layout.ww), layout, key_mask), layout.wh, layout.ww, h, w
        )
        return torch.roll(y, (s, s), (1, 2)) if s else y


class SwinStage(nn.Module):
    """Optional patch merge, then blocks alternating plain and shifted windows."""

    grad_checkpointing = False

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        drop_paths,
        merge: bool,
        pos_hidden: int,
    ):
        super().__init__()
        self.downsample = PatchMerge(in_dim, dim) if merge else nn.Identity()
        self.merge = merge
        self.blocks = nn.ModuleList(
            [
                SwinBlock(dim, num_heads, mlp_ratio, shifted=i % 2 == 1, drop_path=drop_paths[i], pos_hidden=pos_hidden)
                for i in range(depth)
            ]
        )

    def forward(self, x, coords, window: int, key_mask_map=None, span: int = 1):
        """``coords`` None on the regular grid; ``span`` true tokens per map token along a side (2 on the compact
        map)."""
        if self.merge:
            x = self.downsample(x)
            coords = coords[:, ::2, ::2] / 2 if coords is not None else None
            if key_mask_map is not None:
                key_mask_map = key_mask_map[:, ::2, ::2]
        h, w = x.shape[1], x.shape[2]
        layouts = [WindowLayout(h, w, window, s, coords, span, x.device) for s in (0, window // 2)]
        use = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            layout = layouts[1] if blk.shifted else layouts[0]
            x = checkpoint(blk, x, layout, key_mask_map, use_reentrant=False) if use else blk(x, layout, key_mask_map)
        return x, coords, key_mask_map


def grid_coords(h: int, w: int, device=None) -> torch.Tensor:
    """(1, H, W, 2) float (row, column) coordinates of a regular token grid."""
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([r, c], -1).float().unsqueeze(0)  # (1, H, W, 2)


class SwinUM(PyramidEncoder):
    """Hierarchical Swin encoder usable at full resolution and on UM-MAE's compact input."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size: int = 16,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        pos_hidden: int = 32,
        global_pool: str = "avg",
        **kwargs,
    ):
        super().__init__()
        self.img_size, self.patch_size, self.window_size = canonical(img_size), patch_size, window_size
        self.num_classes, self.global_pool = num_classes, global_pool
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.embed_dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.check_size(img_size)
        self.patch_embed = nn.Sequential()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth,
                    heads,
                    mlp_ratio,
                    dpr[start : start + depth],
                    merge=i > 0,
                    pos_hidden=pos_hidden,
                )
            )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.released_init()

    def fits(self, img_size, compact: bool = False) -> bool:
        """Along each side, every stage is one window or a whole number of windows (windows halved on the compact
        input); height and width are checked apart, so rectangles fit when both sides do."""
        for side in pair(img_size):
            if side % self.patch_size:
                return False
            res, win = side // self.patch_size, self.window_size
            if compact:
                res, win = res // 2, win // 2
            for _ in self.embed_dims:
                if res > win and res % win:
                    return False
                res //= 2
        return True

    def check_size(self, img_size, compact: bool = False) -> None:
        """Raises, listing the valid sizes, when a stage is not one window or whole windows along a side."""
        if not self.fits(img_size, compact):
            sizes = [size for size in range(32, 513, 32) if self.fits(size, compact)]
            mode = "UM-MAE's compact input (window halved)" if compact else "full resolution"
            raise ValueError(
                f"image size {size_text(img_size)} does not fit window {self.window_size} of this Swin at "
                f"{mode}: every stage must be one window or a whole number of windows along each side. Valid "
                f"sides up to 512 px: {sizes}"
            )

    def no_weight_decay(self):
        """Nothing beyond timm's rule (no absolute position embedding)."""
        return set()

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Patch embedding and its LayerNorm: (B, H/4, W/4, C)."""
        return self.patch_embed.norm(self.patch_embed.proj(img).permute(0, 2, 3, 1))  # (B, H, W, C)

    def run_stages(self, x, coords, window: int, key_mask_map=None, collect: bool = False, span: int = 1):
        """Every stage on a map whose ``coords`` are given (compact map) or regular (None)."""
        outs = []
        for stage in self.stages:
            x, coords, key_mask_map = stage(x, coords, window, key_mask_map, span)
            outs.append(x)
        return (x, outs) if collect else x

    def forward_tokens(self, x: torch.Tensor, key_mask_map=None) -> torch.Tensor:
        """Embedded stage-1 tokens (B, H, W, C) on the regular grid -> normalized final map."""
        return self.norm(self.run_stages(x, None, self.window_size, key_mask_map))

    def forward_compact(self, tokens: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """UM-MAE: compact map (B, Hc, Wc, C) with true stage-1 coordinates (B, Hc, Wc, 2); windows halved."""
        return self.norm(self.run_stages(tokens, coords, self.window_size // 2, span=2))

    def mask_token_input(self, token: torch.Tensor) -> torch.Tensor:
        """UM-MAE's secondary-mask token goes through the patch-embedding norm in Swin (UM-MAE#10)."""
        return self.patch_embed.norm(token)

    def forward_uniform(self, tokens: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """UM-MAE: ``tokens`` is the compact map of the kept patches ``ids`` (block order) of a ``grid`` of patches;
        each token carries its true coordinate for the position bias."""
        n, hc, wc, _ = tokens.shape
        coords = compact(grid_coords(2 * hc, 2 * wc, tokens.device).expand(n, -1, -1, -1), ids, grid)
        return self.forward_compact(tokens, coords)

    def stage_outputs(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(normalized final map, every stage's NHWC map) for ``features_only``."""
        last, outs = self.run_stages(self.embed(img), None, self.window_size, collect=True)
        return self.norm(last), outs


def _cfg(img_size: int) -> dict:
    return pyramid_cfg(img_size, "patch_embed.proj")


default_cfgs = generate_default_cfgs(
    {
        "mimswin_pico_patch4_window16_128.untrained": _cfg(128),
        "mimswin_tiny_patch4_window16_256.untrained": _cfg(256),
        "mimswin_base_patch4_window16_256.untrained": _cfg(256),
        "mimswin_large_patch4_window16_256.untrained": _cfg(256),
    }
)


@register_model
def mimswin_pico_patch4_window16_128(pretrained=False, **kwargs) -> SwinUM:
    """CPU-sized Swin (32-d, depths 1-1-1-1) at 128 px: tests and demos."""
    return create_pyramid(
        SwinUM,
        "mimswin_pico_patch4_window16_128",
        pretrained,
        dict(img_size=128, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=16),
        **kwargs,
    )


@register_model
def mimswin_tiny_patch4_window16_256(pretrained=False, **kwargs) -> SwinUM:
    """Swin-T as in UM-MAE: 96-d, depths 2-2-6-2, window 16 at 256 px (8 on the compact input)."""
    return create_pyramid(
        SwinUM,
        "mimswin_tiny_patch4_window16_256",
        pretrained,
        dict(img_size=256, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=16),
        **kwargs,
    )


@register_model
def mimswin_base_patch4_window16_256(pretrained=False, **kwargs) -> SwinUM:
    """Swin-B: 128-d, depths 2-2-18-2, window 16 at 256 px."""
    return create_pyramid(
        SwinUM,
        "mimswin_base_patch4_window16_256",
        pretrained,
        dict(img_size=256, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=16),
        **kwargs,
    )


@register_model
def mimswin_large_patch4_window16_256(pretrained=False, **kwargs) -> SwinUM:
    """Swin-L as in UM-MAE: 192-d, depths 2-2-18-2, window 16 at 256 px, 64-wide position MLP."""
    return create_pyramid(
        SwinUM,
        "mimswin_large_patch4_window16_256",
        pretrained,
        dict(
            img_size=256, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=16, pos_hidden=64
        ),
        **kwargs,
    )
