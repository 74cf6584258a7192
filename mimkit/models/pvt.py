"""PVT with pooling spatial reduction (docs/methods.md 4.5), with timm's model API.

Keys and values are computed from ``avg_pool2d(x, r) -> Conv1x1 -> LayerNorm`` where the pooling ratio ``r`` is a
run-time choice, so the same weights serve full-resolution fine-tuning (ratios [8, 4, 2, 1]) and UM-MAE's compact
input (ratios halved: [4, 2, 1, 1]). As in the released UM-MAE PVT, the reduction conv and its norm exist in every
stage, ratio 1 included (pooling 1, then the 1x1 conv and the norm), and a stage's patch embedding is a bare strided
conv with no LayerNorm after it; ``embed_norm=True`` adds PVT v1's norm and ``reduce_every_stage=False`` drops the
reduction where the full-resolution ratio is 1 (PVT v1's layout; docs/design.md).
A fixed sin-cos position embedding is added at the input of stage 1 only (UM-MAE, paper B.1); it is a parameter so
that fine-tuning may learn it. One LayerNorm follows the last stage (PVT v1); intermediate features are not normed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from mimkit.masking import compact
from mimkit.models._checkpoint import run_blocks
from mimkit.models._pyramid import PyramidEncoder, create_pyramid, pyramid_cfg
from mimkit.models._size import canonical, pair, size_text
from mimkit.models.layers import PreNormBlock, drop_path_rates, patch_linear
from mimkit.models.pos_embed import sincos_2d


class SRAttention(nn.Module):
    """Attention whose keys and values come from an average-pooled, 1x1-projected, normed map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True, reduce: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.reduce = reduce or sr_ratio > 1
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if self.reduce:
            self.sr = nn.Conv2d(dim, dim, 1)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        b, h, w, c = x.shape
        hd = c // self.num_heads
        q = self.q(x).view(b, h * w, self.num_heads, hd).transpose(1, 2)
        if self.reduce:  # pooled channel-last (avg_pool2d keeps the layout), the 1x1 conv as a matrix product
            y = F.avg_pool2d(x.permute(0, 3, 1, 2), pool).permute(0, 2, 3, 1) if pool > 1 else x
            y = self.norm(patch_linear(y, self.sr).reshape(b, -1, c))
        else:
            y = x.reshape(b, h * w, c)
        # split along the (2) axis of the row itself: the backward stacks the two gradients straight into the
        # product's layout (splitting a permuted copy's first axis needs a second, permuting copy)
        k, v = (t.transpose(1, 2) for t in self.kv(y).view(b, -1, 2, self.num_heads, hd).unbind(2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class PVTBlock(PreNormBlock):
    """Pre-norm transformer block with spatial-reduction attention."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path=0.0, reduce=True):
        super().__init__(dim, SRAttention(dim, num_heads, sr_ratio, reduce=reduce), mlp_ratio, drop_path)


class StageEmbed(nn.Module):
    """A stage's patch embedding: a strided conv (``proj``) and an optional LayerNorm (``norm``). Called on a later
    stage's NHWC input it applies the conv as ``patch_linear`` (one matrix product, no layout round trip); the first
    stage embeds the NCHW image with the conv itself (``PVTStage.embed``)."""

    def __init__(self, in_dim: int, dim: int, patch: int, norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, patch, patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', dim)."""
        return self.norm(patch_linear(x, self.proj))


class PVTStage(nn.Module):
    """A stage's patch embedding (a strided conv, + LayerNorm with ``embed_norm``) and its blocks."""

    grad_checkpointing = False

    def __init__(
        self, in_dim, dim, depth, num_heads, mlp_ratio, sr_ratio, patch, drop_paths, embed_norm=False, reduce=True
    ):
        super().__init__()
        self.sr_ratio = sr_ratio
        self.patch_embed = StageEmbed(in_dim, dim, patch, embed_norm)
        self.blocks = nn.ModuleList(
            [PVTBlock(dim, num_heads, mlp_ratio, sr_ratio, dp, reduce=reduce) for dp in drop_paths]
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', dim), contiguous: a permuted view would be carried through the stage's
        residual stream and copied by every LayerNorm, forward and backward."""
        return self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1).contiguous())

    def embed_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', dim): ``embed`` of a channel-last map (a later stage's input)."""
        return self.patch_embed(x)

    def run_blocks(self, x: torch.Tensor, compact: bool) -> torch.Tensor:
        """The blocks at full-resolution pooling ratios, or halved ones on the compact map."""
        pool = max(1, self.sr_ratio // 2) if compact else self.sr_ratio
        if self.sr_ratio > 1 and (x.shape[1] % pool or x.shape[2] % pool):
            raise ValueError(f"a {x.shape[1]}x{x.shape[2]} map is not divisible by the spatial-reduction ratio {pool}")
        return run_blocks(self.blocks, x, pool, enabled=self.grad_checkpointing)


class PVT(PyramidEncoder):
    # lr-decay groups: stage-1 embedding and position embedding first; a later stage's patch embedding joins its
    # first block
    """PVT (v1 layout) with pooling spatial reduction, usable at full resolution and on UM-MAE's compact map."""

    group_stem = r"^stages\.0\.patch_embed|^pos_embed"
    group_merge = "patch_embed"

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims=(64, 128, 320, 512),
        depths=(3, 4, 6, 3),
        num_heads=(1, 2, 5, 8),
        mlp_ratios=(8, 8, 4, 4),
        sr_ratios=(8, 4, 2, 1),
        patch_size: int = 4,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        embed_norm: bool = False,
        reduce_every_stage: bool = True,
        **kwargs,
    ):
        super().__init__()
        self.img_size, self.patch_size, self.num_classes = canonical(img_size), patch_size, num_classes
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.sr_ratios = list(sr_ratios)
        self.check_size(img_size)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i in range(len(depths)):
            start = sum(depths[:i])
            self.stages.append(
                PVTStage(
                    in_chans if i == 0 else embed_dims[i - 1],
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    patch_size if i == 0 else 2,
                    dpr[start : start + depths[i]],
                    embed_norm=embed_norm,
                    reduce=reduce_every_stage,
                )
            )
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.pos_grid = (pair(img_size)[0] // patch_size, pair(img_size)[1] // patch_size)
        self.pos_embed = nn.Parameter(sincos_2d(embed_dims[0], self.pos_grid).unsqueeze(0))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"stages.{i}") for i, d in enumerate(embed_dims)
        ]
        self.released_init()

    def _fits(self, img_size) -> bool:
        for side in pair(img_size):
            res = side // self.patch_size
            if side % self.patch_size:
                return False
            for i, sr in enumerate(self.sr_ratios):
                if i and res % 2:
                    return False
                res = res if i == 0 else res // 2
                if sr > 1 and res % sr:
                    return False
        return True

    def check_size(self, img_size, compact: bool = False) -> None:
        """Raises when ``img_size`` does not fit the stages; the compact input (ratios halved) fits whenever the full
        size does and the sides are multiples of 64 (checked by UM-MAE)."""
        if not self._fits(img_size):
            valid = [s for s in range(32, 513, 32) if self._fits(s)]
            raise ValueError(
                f"image size {size_text(img_size)} does not fit this PVT: every stage's map must halve evenly "
                f"and be divisible by its spatial-reduction ratio {list(self.sr_ratios)} along each side. Valid "
                f"sides up to 512 px: {valid}"
            )

    def no_weight_decay(self):
        """The position embedding."""
        return {"pos_embed"}

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C) position embedding, resampled bicubically when the grid differs from the trained one."""
        gh, gw = self.pos_grid
        pe = self.pos_embed.view(1, gh, gw, -1)
        if (h, w) != (gh, gw):
            pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            pe = pe.permute(0, 2, 3, 1)
        return pe

    def stem_conv(self) -> nn.Conv2d:
        """The first patch-embedding convolution."""
        return self.stages[0].patch_embed.proj

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Stage-1 patch embedding: (B, H/4, W/4, C), before the position embedding."""
        return self.stages[0].embed(img)

    def run_stages(self, x: torch.Tensor, compact: bool, collect: bool = False):
        """Every stage (its embedding, then blocks) and the final norm; ``collect`` also returns stage maps."""
        outs = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = stage.embed_nhwc(x)
            x = stage.run_blocks(x, compact)
            outs.append(x)
        x = self.norm(x)
        return (x, outs[:-1] + [x]) if collect else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded stage-1 tokens on the full grid (positions added here) -> normalized final map."""
        return self.run_stages(x + self.pos_embed_for(x.shape[1], x.shape[2]).to(x.dtype), compact=False)

    def forward_compact(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """UM-MAE: compact stage-1 map (B, Hc, Wc, C) plus its compacted position embedding; ratios halved."""
        return self.run_stages(tokens + pos.to(tokens.dtype), compact=True)

    def mask_token_input(self, token: torch.Tensor) -> torch.Tensor:
        """UM-MAE's secondary-mask token is used as is in PVT (not through the patch-embedding norm, if there is
        one; UM-MAE#10)."""
        return token

    def forward_uniform(self, tokens: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """UM-MAE: compact map of the kept patches ``ids``; the full-grid position embedding is compacted the same
        way, so secondary-mask tokens carry their true position."""
        n, hc, wc, _ = tokens.shape
        pos = compact(self.pos_embed_for(2 * hc, 2 * wc).expand(n, -1, -1, -1), ids, grid)
        return self.forward_compact(tokens, pos)

    def stage_outputs(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(normalized final map, every stage's NHWC map) for ``features_only``."""
        tokens = self.embed(img)
        return self.run_stages(tokens + self.pos_embed_for(*tokens.shape[1:3]).to(tokens.dtype), False, True)


def _cfg(img_size: int) -> dict:
    return pyramid_cfg(img_size, "stages.0.patch_embed.proj")


default_cfgs = generate_default_cfgs(
    {
        "mimpvt_pico_128.untrained": _cfg(128),
        "mimpvt_small_256.untrained": _cfg(256),
    }
)


@register_model
def mimpvt_pico_128(pretrained=False, **kwargs) -> PVT:
    """CPU-sized PVT (dims 32-64-128-256, depths 1-1-1-1) at 128 px: tests and demos."""
    return create_pyramid(
        PVT,
        "mimpvt_pico_128",
        pretrained,
        dict(
            img_size=128,
            embed_dims=(32, 64, 128, 256),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 4, 8),
            mlp_ratios=(4, 4, 4, 4),
        ),
        **kwargs,
    )


@register_model
def mimpvt_small_256(pretrained=False, **kwargs) -> PVT:
    """PVT-S as in UM-MAE: dims 64-128-320-512, depths 3-4-6-3, SR ratios 8-4-2-1 (4-2-1-1 on compact input)."""
    return create_pyramid(PVT, "mimpvt_small_256", pretrained, dict(img_size=256), **kwargs)
