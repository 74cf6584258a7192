"""ViT with a learned relative position bias in every block and no absolute position embedding: the encoder LoMaR
pretrains on small windows and fine-tunes on whole images.

The model is timm's ``Beit`` class (per-block relative position bias, class token, fused attention) without layer
scale, registered under mimkit names so that exports load with ``timm.create_model(name, pretrained=True, ...)``.
A bias table covers every offset of its window; ``expand_rel_pos_table`` carries a table trained on small windows to
a larger grid by clipping offsets that were never seen to the outermost trained ones (the rule of LoMaR's iRPE
buckets, where long offsets share the outermost bucket), instead of stretching it by interpolation.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.beit import Beit, checkpoint_filter_fn

from mimkit.models.vit import vit_cfg

default_cfgs = generate_default_cfgs(
    {
        "rpbvit_pico_patch8_64.untrained": vit_cfg(64),
        "rpbvit_nano_patch8_96.untrained": vit_cfg(96),
        "rpbvit_small_patch16_224.untrained": vit_cfg(224),
        "rpbvit_base_patch16_224.untrained": vit_cfg(224),
        "rpbvit_large_patch16_224.untrained": vit_cfg(224),
    }
)


def _create(variant: str, pretrained: bool, arch: dict, **kwargs) -> Beit:
    out_indices = kwargs.pop("out_indices", 3)
    args = dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=None, mlp_ratio=4.0, **arch)
    return build_model_with_cfg(
        Beit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**args, **kwargs},
    )


@register_model
def rpbvit_pico_patch8_64(pretrained: bool = False, **kwargs) -> Beit:
    """Relative-position ViT-Pico/8 at 64 px (96-d x 4): CPU tests and the demo."""
    return _create(
        "rpbvit_pico_patch8_64",
        pretrained,
        dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3),
        **kwargs,
    )


@register_model
def rpbvit_nano_patch8_96(pretrained: bool = False, **kwargs) -> Beit:
    """Relative-position ViT-Nano/8 at 96 px (192-d x 6): CPU-sized pretraining."""
    return _create(
        "rpbvit_nano_patch8_96",
        pretrained,
        dict(img_size=96, patch_size=8, embed_dim=192, depth=6, num_heads=3),
        **kwargs,
    )


@register_model
def rpbvit_small_patch16_224(pretrained: bool = False, **kwargs) -> Beit:
    """Relative-position ViT-S/16 (384-d x 12)."""
    return _create(
        "rpbvit_small_patch16_224", pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs
    )


@register_model
def rpbvit_base_patch16_224(pretrained: bool = False, **kwargs) -> Beit:
    """Relative-position ViT-B/16 (768-d x 12): LoMaR's encoder."""
    return _create(
        "rpbvit_base_patch16_224", pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs
    )


@register_model
def rpbvit_large_patch16_224(pretrained: bool = False, **kwargs) -> Beit:
    """Relative-position ViT-L/16 (1024-d x 24)."""
    return _create(
        "rpbvit_large_patch16_224", pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs
    )


def table_window(table: torch.Tensor) -> int:
    """Edge of the square window a relative-position table (``(2w-1)^2 + 3`` rows) was built for."""
    side = round((table.shape[0] - 3) ** 0.5)
    if side * side + 3 != table.shape[0] or side % 2 == 0:
        raise ValueError(f"a relative position table of {table.shape[0]} rows is not (2w-1)^2 + 3 for a square window")
    return (side + 1) // 2


def expand_rel_pos_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """Relative position table of a square window -> the table of a ``new_window`` window: the bias of offset
    (dy, dx) is the old bias of (clip(dy), clip(dx)) with each offset clipped to the old window's range; the three
    class-token entries are kept. Shrinking keeps the offsets that still exist."""
    old = table_window(table)
    r_old, r_new = old - 1, new_window - 1
    d = torch.arange(-r_new, r_new + 1, device=table.device).clamp(-r_old, r_old) + r_old
    idx = (d.view(-1, 1) * (2 * r_old + 1) + d.view(1, -1)).flatten()
    return torch.cat([table[idx], table[-3:]], dim=0)
