"""Plain ViT encoders: timm's VisionTransformer with fixed sin-cos position embeddings and MAE initialization.

The encoder is a real timm model, so its state dict already uses timm's key names; small CPU-sized variants are
registered with timm here so that exported weights load with ``timm.create_model(name, pretrained=True, ...)``.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from mimkit.models._checkpoint import run_blocks
from mimkit.models.pos_embed import sincos_2d


def vit_cfg(img_size: int) -> dict:
    """timm's pretrained-config dict for a small ViT at ``img_size``."""
    return dict(
        num_classes=1000,
        input_size=(3, img_size, img_size),
        first_conv="patch_embed.proj",
        classifier="head",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bicubic",
        crop_pct=0.875,
        license="apache-2.0",
    )


# Read by timm's @register_model: pretrained configs for the small variants (weights come from your own export).
default_cfgs = generate_default_cfgs(
    {
        "vit_pico_patch8_64.untrained": vit_cfg(64),
        "vit_nano_patch8_96.untrained": vit_cfg(96),
    }
)


def _small_vit(variant: str, pretrained: bool, arch: dict, **kwargs) -> VisionTransformer:
    # features_only as timm's own ViTs: the last 3 blocks' maps by default, through the model's intermediate getter
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **{**arch, **kwargs},
    )


@register_model
def vit_pico_patch8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Pico/8 at 64 px (0.45 M parameters): CPU tests and the bundled demo."""
    arch = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    return _small_vit("vit_pico_patch8_64", pretrained, arch, **kwargs)


@register_model
def vit_nano_patch8_96(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Nano/8 at 96 px (2.7 M parameters): CPU-sized pretraining on small images."""
    arch = dict(img_size=96, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    return _small_vit("vit_nano_patch8_96", pretrained, arch, **kwargs)


def mae_init_(module: nn.Module) -> None:
    """MAE initialization: xavier-uniform Linear (bias 0), LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def create_vit_encoder(name: str, img_size: int, drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    """A timm ViT without classifier, fixed sin-cos position embedding, MAE initialization."""
    from mimkit.models import create_encoder

    encoder = create_encoder(name, img_size=img_size, drop_path_rate=drop_path_rate, **kwargs)
    return prepare_mae_vit(encoder, name)


def prepare_mae_vit(encoder: nn.Module, name: str) -> VisionTransformer:
    """Fixed sin-cos position embedding and MAE initialization for a timm ViT with a class token."""
    if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None or encoder.no_embed_class:
        raise ValueError(f"encoder '{name}' is not a plain timm ViT with a class token")
    grid = encoder.patch_embed.grid_size
    pos = encoder.pos_embed
    if pos is None:
        raise ValueError(f"encoder '{name}' has no position embedding (a timm ViT built with pos_embed='none')")
    with torch.no_grad():
        pos.copy_(sincos_2d(encoder.embed_dim, grid, cls_token=True).unsqueeze(0))
    pos.requires_grad_(False)
    mae_init_(encoder)
    w = encoder.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(encoder.cls_token, std=0.02)
    return encoder


def vit_encode(encoder: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens that already carry their position embedding (any subset, any order) -> prepend the class token
    (with its position), run the blocks and the final norm: (N, 1 + K, C)."""
    pos, cls_token = encoder.pos_embed, encoder.cls_token
    assert pos is not None and cls_token is not None  # prepare_mae_vit checked both
    cls = (cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    return encoder.norm(run_blocks(encoder.blocks, x, enabled=encoder.grad_checkpointing))


def vit_masked_tokens(
    encoder: VisionTransformer, img: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """SimMIM on a ViT: patch tokens where ``mask`` (N, L) is 1 are replaced by ``mask_token`` before the position
    embedding; returns the final patch-token map (N, h, w, C)."""
    x = encoder.patch_embed(img)
    w = mask.unsqueeze(-1).to(x.dtype)
    x = x * (1 - w) + mask_token.reshape(1, 1, -1).to(x.dtype) * w
    assert encoder.pos_embed is not None  # prepare_mae_vit checked it
    x = vit_encode(encoder, x + encoder.pos_embed[:, 1:])[:, 1:]
    h, w_ = encoder.patch_embed.grid_size
    return x.reshape(x.shape[0], h, w_, -1)
