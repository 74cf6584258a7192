"""DyViT: a hierarchical ViT whose first three stages never look outside a 32 px mask unit, with Dynamic Multi-Window
Self-Attention (DM-MSA) there and global attention in stage 4. mimkit's design from coma.md section 3 (the CoMA paper's
method section was not available; see docs/coma.md).

- Patch embedding 4 px; stages at strides 4 / 8 / 16 / 32; each 32 px unit is an 8x8, 4x4, 2x2, 1x1 token map.
- DM-MSA (stages 1-3): the heads are split into groups; group g attends inside windows of ``windows[g]`` tokens
  within the unit, with its own relative position bias table; the group outputs are weighted by input-dependent
  weights (pool over the unit, small MLP, softmax over groups: they sum to one) and projected.
- Patch merging (2x2 concatenation -> LayerNorm -> Linear) stays inside a unit.
- Stage 4: one token per unit plus a fixed sin-cos position of the unit, global attention (timm ViT blocks, SDPA).

Because nothing crosses a unit before stage 4, encoding only the visible units (``forward_visible(img, ids)``) is
exactly the full-image computation restricted to them: pretraining drops masked units with no mask tokens.

``unit_context=True`` adds cross-unit context to stages 1-3 (``UnitContext``: the units present exchange one pooled
token each through a global block after every stage), so that stride-4/8/16 features see beyond 32 px; dropping masked
units still needs no mask tokens, the visible units then see each other as an MAE encoder's tokens do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import gather_tokens
from mimkit.models._checkpoint import run_blocks
from mimkit.models._pyramid import PyramidEncoder, create_pyramid, pyramid_cfg
from mimkit.models._size import require_square
from mimkit.models.layers import (
    PatchMerging,
    PreNormBlock,
    bias_rows,
    drop_path_rates,
    relative_index,
    window_partition,
    window_reverse,
)
from mimkit.models.pos_embed import sincos_2d
from mimkit.patches import patchify_channels_first

UNIT = 32  # px: the mask unit and the total stride


class DMMSA(nn.Module):
    """Dynamic multi-window self-attention on (B', t, t, C) unit maps."""

    def __init__(self, dim: int, num_heads: int, windows: tuple[int, ...], fusion_reduction: int = 4):
        super().__init__()
        if num_heads % len(windows):
            raise ValueError(f"{num_heads} heads cannot be split into {len(windows)} window groups")
        self.windows = tuple(windows)
        self.group_heads = num_heads // len(windows)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.zeros((2 * w - 1) ** 2, self.group_heads)) for w in self.windows]
        )
        for t in self.tables:
            nn.init.trunc_normal_(t, std=0.02)
        hidden = max(dim // fusion_reduction, 8)
        self.fuse = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(windows)))

    def fusion_weights(self, y: torch.Tensor) -> torch.Tensor:
        """(B', t, t, C) concatenated group outputs -> (B', groups) weights, softmax over groups."""
        return self.fuse(y.mean(dim=(1, 2))).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _, c = x.shape
        g, hg, hd = len(self.windows), self.group_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, t, 3, g, hg * hd)
        outs = []
        for i, (win, table) in enumerate(zip(self.windows, self.tables)):  # a few head groups, not tokens
            w = min(win, t)
            part = window_partition(qkv[:, :, :, :, i].reshape(b, t, t, 3 * hg * hd), w, w)  # (B', nW, T, 3*hg*hd)
            q, k, v = part.view(b, -1, w * w, 3, hg, hd).permute(3, 0, 1, 4, 2, 5)
            bias = bias_rows(table, relative_index(w, w, win, x.device)).permute(2, 0, 1).to(q.dtype)  # (hg, T, T)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B', nW, hg, T, hd)
            outs.append(window_reverse(o.transpose(2, 3).reshape(b, -1, w * w, hg * hd), w, w, t, t))
        y = torch.cat(outs, dim=-1)
        a = self.fusion_weights(y) * g  # uniform weights leave the groups unscaled
        y = (y.view(b, t, t, g, hg * hd) * a.view(b, 1, 1, g, 1).to(y.dtype)).reshape(b, t, t, c)
        return self.proj(y)


class DyBlock(PreNormBlock):
    """DyViT block of stages 1-3: DM-MSA inside each unit, then an MLP."""

    def __init__(self, dim: int, num_heads: int, windows, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__(dim, DMMSA(dim, num_heads, windows), mlp_ratio, drop_path)


class UnitContext(nn.Module):
    """Cross-unit context for a DM-MSA stage (``unit_context=True``): every unit present (in pretraining: the visible
    ones) is mean-pooled to one token, given its unit's sin-cos position, and the tokens attend to each other in one
    global transformer block; the result, projected, is added to every token of its unit. Masked units stay dropped
    (no mask tokens), and a stride-4/8/16 feature now depends on the whole image, as in Swin or PVT (docs/coma.md)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = Block(dim, num_heads, mlp_ratio=2.0, qkv_bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch: int, pos: torch.Tensor) -> torch.Tensor:
        """x: (B*K, t, t, C) unit maps of ``batch`` images; pos: (B, K, C) their units' positions."""
        n, _, _, c = x.shape
        units = self.norm(x.mean(dim=(1, 2))).view(batch, n // batch, c) + pos.to(x.dtype)
        return x + self.proj(self.mix(units)).reshape(n, 1, 1, c)


class DyStage(nn.Module):
    """Patch merging inside each unit (stages 2-3), then DyBlocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        windows,
        mlp_ratio: float,
        drop_paths,
        merge: bool,
        global_attention: bool,
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if merge else nn.Identity()
        self.global_attention = global_attention
        if global_attention:
            self.blocks = nn.ModuleList(
                [Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_paths[i]) for i in range(depth)]
            )
        else:
            self.blocks = nn.ModuleList(
                [DyBlock(dim, num_heads, windows, mlp_ratio, drop_paths[i]) for i in range(depth)]
            )


class DyViT(PyramidEncoder):
    """Mask-unit hierarchical ViT with DM-MSA; timm's classifier API, features_only at strides 4-32."""

    unit_pos: torch.Tensor  # a buffer: the fixed sin-cos positions of the built grid of units
    contexts: Any  # nn.ModuleList of UnitContext, or None

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        windows=((2, 4, 8), (2, 2, 4), (2, 2, 2)),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        unit_context: bool = False,
        **kwargs,
    ):
        super().__init__()
        if len(depths) != 4 or len(windows) != 3:
            raise ValueError("DyViT has four stages (three DM-MSA stages with a window set each, one global stage)")
        img_size = require_square(img_size, "DyViT")
        self.img_size, self.patch_size, self.unit = img_size, 4, UNIT
        self.num_classes, self.global_pool = num_classes, global_pool
        dims = [embed_dim * 2**i for i in range(4)]
        self.embed_dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.check_size(img_size)
        self.patch_embed = nn.Sequential()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, 4, 4)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        grid = (img_size // UNIT,) * 2
        self.register_buffer("unit_pos", sincos_2d(dims[-1], grid), persistent=False)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(
                DyStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    windows[i] if i < 3 else None,
                    mlp_ratio,
                    dpr[start : start + depths[i]],
                    merge=i > 0,
                    global_attention=i == 3,
                )
            )
        self.unit_context = unit_context
        self.contexts = nn.ModuleList([UnitContext(dims[i], num_heads[i]) for i in range(3)]) if unit_context else None
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.apply(self.init_weights)

    @staticmethod
    def check_size(img_size: int) -> None:
        """Raises when ``img_size`` is not a whole number of 32 px units."""
        if img_size % UNIT or img_size < UNIT:
            raise ValueError(
                f"image size {img_size} px is not a whole number of DyViT's {UNIT} px units; use a "
                f"multiple of {UNIT} (e.g. {max(UNIT, img_size // UNIT * UNIT)} or "
                f"{(img_size // UNIT + 1) * UNIT})"
            )

    def no_weight_decay(self):
        """The DM-MSA relative-position tables."""
        return {n for n, _ in self.named_parameters() if ".tables." in n}

    def unit_grid(self, img: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of 32 px units of ``img``; raises when it is not whole units."""
        h, w = img.shape[-2:]
        if h % UNIT or w % UNIT:
            raise ValueError(f"a {h}x{w} image is not a whole number of {UNIT} px units")
        return h // UNIT, w // UNIT

    def positions(self, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        """Stage-4 unit positions for ``grid`` (recomputed when it differs from the built one)."""
        pos = self.unit_pos
        if pos.shape[0] != grid[0] * grid[1] or grid[0] != round(pos.shape[0] ** 0.5):
            pos = sincos_2d(pos.shape[-1], grid).to(ref.device)
        return pos.to(ref.dtype)

    def unit_stages(self, img: torch.Tensor, ids: torch.Tensor | None):
        """Stages 1-3 on the units ``ids`` (B, K) (all units when None): per-unit maps (B*K, t, t, C) per stage."""
        b, c = img.shape[:2]
        grid = self.unit_grid(img)  # a clear error for sizes that are not whole units
        units = patchify_channels_first(img, UNIT)  # (B, units, C*32*32)
        if ids is not None:
            units = gather_tokens(units, ids)
        x = units.reshape(-1, c, UNIT, UNIT)
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))  # (B*K, 8, 8, C)
        outs = []
        for i, stage in enumerate(self.stages[:3]):
            x = stage.downsample(x)
            x = run_blocks(stage.blocks, x, enabled=self.grad_checkpointing)
            if self.contexts is not None:
                pos = sincos_2d(x.shape[-1], grid).to(x.device).unsqueeze(0).expand(b, -1, -1)
                x = self.contexts[i](x, b, gather_tokens(pos, ids) if ids is not None else pos)
            outs.append(x)
        return x, outs

    def forward_visible(self, img: torch.Tensor, ids: torch.Tensor | None = None, collect: bool = False):
        """Encode the units ``ids`` (B, K) of each image (raster unit indices, any order; None = all): (B, K, C)
        normalized stage-4 tokens, in the order of ``ids``."""
        b = img.shape[0]
        grid = self.unit_grid(img)
        x, outs = self.unit_stages(img, ids)
        last = self.stages[3]
        x = last.downsample(x).reshape(b, -1, self.num_features)
        pos = self.positions(grid, x).unsqueeze(0).expand(b, -1, -1)
        x = x + (gather_tokens(pos, ids) if ids is not None else pos)
        x = run_blocks(last.blocks, x, enabled=self.grad_checkpointing)
        x = self.norm(x)
        return (x, outs) if collect else x

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """All units of full images: the normalized final map (B, H/32, W/32, C)."""
        gh, gw = self.unit_grid(img)
        return self.forward_visible(img).reshape(img.shape[0], gh, gw, -1)

    encode_masked = None  # type: ignore[assignment]  # not a MaskTokenEncoder: DyViT drops masked units, no mask tokens

    # mimkit.models.interfaces.VisibleTokenEncoder (CoMA, MAE)
    has_cls = False
    replaces_tokens = False

    @property
    def mask_grid(self) -> tuple[int, int]:
        return (self.img_size // self.unit,) * 2

    @property
    def out_dim(self) -> int:
        return self.num_features

    def encode_visible(self, img, ids_keep, replace=None, token=None):
        """The units ``ids_keep`` only: :meth:`forward_visible` (no token replacement: ``replaces_tokens`` is False)."""
        if replace is not None:
            raise ValueError("DyViT cannot replace visible units by a token (replaces_tokens is False)")
        return self.forward_visible(img, ids_keep)

    def stage_outputs(self, img: torch.Tensor):
        """(normalized final map, every stage's NHWC map) for ``features_only``."""
        b = img.shape[0]
        gh, gw = self.unit_grid(img)
        x, outs = self.forward_visible(img, collect=True)
        maps = []
        for o in outs:
            t, ch = o.shape[1], o.shape[-1]
            maps.append(o.view(b, gh, gw, t, t, ch).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * t, gw * t, ch))
        last = x.reshape(b, gh, gw, -1)
        return last, maps + [last]


default_cfgs = generate_default_cfgs(
    {
        "dyvit_pico_128.untrained": pyramid_cfg(128, "patch_embed.proj"),
        "dyvit_tiny_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
        "dyvit_small_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
        "dyvit_base_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
    }
)


@register_model
def dyvit_pico_128(pretrained=False, **kwargs) -> DyViT:
    """CPU-sized DyViT (24-d, depths 1-1-1-1) at 128 px: tests and demos."""
    return create_pyramid(
        DyViT,
        "dyvit_pico_128",
        pretrained,
        dict(img_size=128, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6)),
        **kwargs,
    )


@register_model
def dyvit_tiny_224(pretrained=False, **kwargs) -> DyViT:
    """DyViT-T: Swin-T budget (96-d, depths 2-2-6-2, heads 3-6-12-24)."""
    return create_pyramid(
        DyViT, "dyvit_tiny_224", pretrained, dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), **kwargs
    )


@register_model
def dyvit_small_224(pretrained=False, **kwargs) -> DyViT:
    """DyViT-S: 96-d, depths 2-2-18-2."""
    return create_pyramid(
        DyViT,
        "dyvit_small_224",
        pretrained,
        dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        **kwargs,
    )


@register_model
def dyvit_base_224(pretrained=False, **kwargs) -> DyViT:
    """DyViT-B: 128-d, depths 2-2-18-2, heads 4-8-16-32; two window groups per stage (4 and 8 tokens at stage 1),
    since 128-d heads do not split into three groups."""
    return create_pyramid(
        DyViT,
        "dyvit_base_224",
        pretrained,
        dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), windows=((4, 8), (2, 4), (2, 2))),
        **kwargs,
    )
