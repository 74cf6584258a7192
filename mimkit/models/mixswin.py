"""Swin encoder as MixMAE uses it (docs/methods.md 7.3), with timm's model API.

- Large windows per stage (14-14-14-7 at 224 px), **no shifted windows**, a standard relative-position-bias table per
  block; a stage smaller than its window attends globally.
- Fixed 2-D sin-cos absolute position embedding added after the patch embedding and its LayerNorm.
- Patch merging: 2x2 concatenation -> LayerNorm -> Linear(4C -> 2C).
- ``forward_tokens(x, groups)``: ``groups`` (B or 1, H/32, W/32) in {0, 1} marks which source image each 32 px cell
  of a mixed input came from; attention is then restricted to tokens of the same group in every block. The mask unit
  equals the total stride, so no 2x2 merge ever combines two groups.
"""

from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from mimkit.masking import upsample_cells
from mimkit.models._checkpoint import run_blocks
from mimkit.models._pyramid import PyramidEncoder, create_pyramid, pyramid_cfg
from mimkit.models._size import require_square
from mimkit.models.layers import (
    PatchMerging,
    PreNormBlock,
    bias_rows,
    drop_path_rates,
    relative_index,
    window_attention,
    window_partition,
    window_reverse,
)
from mimkit.models.pos_embed import sincos_2d


def group_attention_mask(groups: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B', H, W) group map -> additive mask (B', nW, 1, T, T): 0 within a group, -inf across groups. Every token
    sees itself, so no row is fully masked (safe in fp16 / bf16)."""
    gw = window_partition(groups.unsqueeze(-1), wh, ww).squeeze(-1)  # (B', nW, T)
    same = gw[..., :, None] == gw[..., None, :]
    return torch.zeros(same.shape, device=groups.device).masked_fill(~same, float("-inf")).unsqueeze(2)


class MaskedWindowAttention(nn.Module):
    """Window attention with a relative-position table; an optional key mask keeps mixed sources apart."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, index: torch.Tensor, group_mask: torch.Tensor | None) -> torch.Tensor:
        b, nw, t, c = x.shape
        q, k, v = self.qkv(x).view(b, nw, t, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        bias = bias_rows(self.relative_position_bias_table, index).permute(2, 0, 1)  # (heads, T, T)
        if group_mask is not None:
            bias = bias + group_mask  # (B', nW, heads, T, T)
        out = window_attention(q, k, v, bias)
        return self.proj(out.transpose(2, 3).reshape(b, nw, t, c))


class MixBlock(PreNormBlock):
    """Pre-norm transformer block over windows, no shift (MixMAE's Swin)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__(dim, MaskedWindowAttention(dim, num_heads, window), mlp_ratio, drop_path)

    def attend(self, y: torch.Tensor, win: tuple[int, int], index: torch.Tensor, group_mask=None) -> torch.Tensor:
        """Attention inside (unshifted) windows of ``win`` tokens."""
        _, h, w, _ = y.shape
        if h % win[0] or w % win[1]:  # an image size check_size refuses, given at run time (an evaluation's)
            raise ValueError(f"a {h}x{w} token map cannot be split into {win[0]}x{win[1]} windows")
        out = self.attn(window_partition(y, *win), index, group_mask)
        return window_reverse(out, win[0], win[1], h, w)


class MixStage(nn.Module):
    """Optional patch merging, then the blocks of one stage at one window size."""

    grad_checkpointing = False

    def __init__(
        self, in_dim: int, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, drop_paths, merge: bool
    ):
        super().__init__()
        self.window = window
        self.downsample = PatchMerging(in_dim, dim) if merge else nn.Identity()
        self.blocks = nn.ModuleList([MixBlock(dim, num_heads, window, mlp_ratio, drop_paths[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        x = self.downsample(x)
        _, h, w, _ = x.shape
        win = (min(self.window, h), min(self.window, w))
        index = relative_index(*win, self.window, x.device)
        group_mask = None
        if groups is not None:  # nearest-upsample the cell map to this stage's resolution
            gmap = upsample_cells(groups, h // groups.shape[1], w // groups.shape[2])
            group_mask = group_attention_mask(gmap, *win)
        return run_blocks(self.blocks, x, win, index, group_mask, enabled=self.grad_checkpointing)


class MixSwin(PyramidEncoder):
    """Hierarchical Swin without shifted windows, whose attention can be confined to the tokens of one source image."""

    pos_embed: torch.Tensor  # a buffer: the fixed sin-cos positions of the built grid

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_sizes=(14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs,
    ):
        super().__init__()
        img_size = require_square(img_size, "MixMAE's Swin")
        self.img_size, self.patch_size, self.window_sizes = img_size, patch_size, tuple(window_sizes)
        self.num_classes, self.global_pool = num_classes, global_pool
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.embed_dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.stride = patch_size * 2 ** (len(depths) - 1)
        self.check_size(img_size)
        self.patch_embed = nn.Sequential()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        grid = (img_size // patch_size,) * 2
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid).view(1, *grid, embed_dim), persistent=False)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.stages.append(
                MixStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth,
                    heads,
                    self.window_sizes[i],
                    mlp_ratio,
                    dpr[start : start + depth],
                    merge=i > 0,
                )
            )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.released_init()

    def fits(self, img_size: int) -> bool:
        """The image is a whole number of mask cells (the total stride) and every stage is one window or a whole
        number of windows."""
        if img_size % self.stride:
            return False
        res = img_size // self.patch_size
        for win in self.window_sizes:
            if res > win and res % win:
                return False
            res //= 2
        return True

    def check_size(self, img_size: int) -> None:
        """Raises when ``img_size`` is not whole mask cells or a stage is not whole windows."""
        if not self.fits(img_size):
            sizes = [s for s in range(32, 1025, 32) if self.fits(s)]
            raise ValueError(
                f"image size {img_size} px does not fit this MixMAE Swin (windows {self.window_sizes}, "
                f"total stride {self.stride} px): every stage must be one window or a whole number of "
                f"windows. Valid sizes up to 1024 px: {sizes}"
            )

    def no_weight_decay(self):
        """The relative-position bias tables."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Patch embedding + its LayerNorm, before the position embedding: (B, H, W, C). Mixing happens here."""
        return self.patch_embed.norm(self.patch_embed.proj(img).permute(0, 2, 3, 1))

    def position(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        """The absolute sin-cos position embedding for an (h, w) map, recomputed when the grid differs."""
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = sincos_2d(pos.shape[-1], (h, w)).view(1, h, w, -1).to(ref.device)
        return pos.to(ref.dtype)

    def run_stages(self, x: torch.Tensor, groups: torch.Tensor | None = None, collect: bool = False):
        """Tokens plus positions through every stage; ``groups`` confines attention to one source."""
        x = x + self.position(x.shape[1], x.shape[2], x)
        outs = []
        for stage in self.stages:
            x = stage(x, groups)
            outs.append(x)
        return (x, outs) if collect else x

    def forward_tokens(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens (B, H, W, C) -> normalized final map; ``groups`` confines attention (MixMAE)."""
        return self.norm(self.run_stages(x, groups))

    def stage_outputs(self, img: torch.Tensor):
        """(normalized final map, every stage's NHWC map) for ``features_only``."""
        last, outs = self.run_stages(self.embed(img), collect=True)
        return self.norm(last), outs


default_cfgs = generate_default_cfgs(
    {
        "mixswin_pico_patch4_window16_128.untrained": pyramid_cfg(128, "patch_embed.proj"),
        "mixswin_base_patch4_window14_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
        "mixswin_large_patch4_window14_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
        "mixswin_huge_patch4_window14_224.untrained": pyramid_cfg(224, "patch_embed.proj"),
    }
)


@register_model
def mixswin_pico_patch4_window16_128(pretrained=False, **kwargs) -> MixSwin:
    """CPU-sized MixMAE Swin (32-d, depths 1-1-1-1, windows 16-16-16-8) at 128 px: tests and demos."""
    return create_pyramid(
        MixSwin,
        "mixswin_pico_patch4_window16_128",
        pretrained,
        dict(img_size=128, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_sizes=(16, 16, 16, 8)),
        **kwargs,
    )


@register_model
def mixswin_base_patch4_window14_224(pretrained=False, **kwargs) -> MixSwin:
    """MixMAE-B: Swin-B/W14 (128-d, depths 2-2-18-2, windows 14-14-14-7), 224 px."""
    return create_pyramid(
        MixSwin,
        "mixswin_base_patch4_window14_224",
        pretrained,
        dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
        **kwargs,
    )


@register_model
def mixswin_large_patch4_window14_224(pretrained=False, **kwargs) -> MixSwin:
    """MixMAE-L: 192-d, depths 2-2-18-2, windows 14-14-14-7, 224 px."""
    return create_pyramid(
        MixSwin,
        "mixswin_large_patch4_window14_224",
        pretrained,
        dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
        **kwargs,
    )


@register_model
def mixswin_huge_patch4_window14_224(pretrained=False, **kwargs) -> MixSwin:
    """MixMAE-H: 352-d, depths 2-2-18-2, windows 14-14-14-7, 224 px."""
    return create_pyramid(
        MixSwin,
        "mixswin_huge_patch4_window14_224",
        pretrained,
        dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
        **kwargs,
    )
