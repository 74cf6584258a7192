"""Build any encoder a method can use: a plain timm ViT (fixed sin-cos positions, MAE init) or a hierarchical
mimkit backbone (Swin, PVT) from the timm registry."""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from mimkit.models.vit import create_vit_encoder


def build_encoder(name: str, img_size: int, drop_path: float = 0.0, encoder_args: dict | None = None):
    args = {"img_size": img_size, **(encoder_args or {})}
    if name.startswith("vit_"):
        encoder = create_vit_encoder(name, drop_path_rate=drop_path, **args)
    else:
        try:
            encoder = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **args)
        except RuntimeError as err:
            raise ValueError(f"unknown encoder '{name}': {err}") from None
        if isinstance(getattr(encoder, "pos_embed", None), torch.nn.Parameter):
            encoder.pos_embed.requires_grad_(False)  # fixed sin-cos during pretraining (UM-MAE, paper B.1)
    return encoder, args


def is_vit(encoder) -> bool:
    return isinstance(encoder, VisionTransformer)
