"""Build any encoder a method can use: a plain timm ViT (fixed sin-cos positions, MAE init) or a hierarchical
mimkit backbone (Swin, PVT) from the timm registry."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from mimkit.models import create_encoder
from mimkit.models._size import canonical
from mimkit.models.vit import prepare_mae_vit


def build_encoder(
    name: str, img_size: int, drop_path: float = 0.0, encoder_args: dict | None = None, in_chans: int = 3
):
    """(encoder, the kwargs that rebuild it with timm); ``in_chans`` input channels (in the kwargs unless 3).

    A timm ViT gets MAE's fixed sin-cos positions and init; any
    other encoder's position embedding, if it has one, is kept fixed during pretraining (UM-MAE, paper B.1)."""
    channels = {"in_chans": in_chans} if in_chans != 3 else {}
    args = {"img_size": canonical(img_size), **channels, **(encoder_args or {})}
    encoder = create_encoder(name, drop_path_rate=drop_path, **args)
    if isinstance(encoder, VisionTransformer):
        prepare_mae_vit(encoder, name)
    elif isinstance(getattr(encoder, "pos_embed", None), torch.nn.Parameter):
        encoder.pos_embed.requires_grad_(False)
    return encoder, args
