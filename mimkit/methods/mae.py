"""MAE (He et al. 2021): per-sample random masking, encoder on visible tokens only, lightweight transformer decoder,
normalized-pixel MSE on the masked patches (docs/methods.md section 2). The encoder is any VisibleTokenEncoder
(mimkit/models/interfaces.py): a plain timm ViT as in the paper, or DyViT (masking its 32 px units)."""

from __future__ import annotations

import torch

from mimkit.masking import random_masking
from mimkit.methods._encoders import build_encoder
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models._size import canonical
from mimkit.models.decoder import visible_token_decoder
from mimkit.models.interfaces import VisibleTokenEncoder


class MAE(MIMMethod):
    """MAE: random masking, the encoder on the visible units only, a light decoder, loss on the masked patches."""

    io: VisibleTokenEncoder  # the encoder as this method may use it (attach_interface; checked by mypy)

    def __init__(
        self,
        encoder: str = "vit_base_patch16_224",
        img_size: int = 224,
        in_chans: int = 3,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.encoder_name = encoder
        self.img_size = canonical(img_size)
        self.encoder, self.encoder_args = build_encoder(encoder, img_size, drop_path, encoder_args, in_chans)
        io: VisibleTokenEncoder = self.attach_interface("io", self.encoder, VisibleTokenEncoder, "MAE")
        self.patch_size, self.grid = io.unit, io.mask_grid
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        values = self.patch_size**2 * in_chans
        self.decoder = visible_token_decoder(io, self.grid, values, decoder_dim, decoder_depth, decoder_heads)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        """Draw a random mask at ``mask_ratio`` and encode the visible units: (latent, the draw)."""
        draw = random_masking(imgs.shape[0], self.grid[0] * self.grid[1], mask_ratio, device=imgs.device)
        return self.io.encode_visible(imgs, draw.ids_keep), draw

    def forward(self, batch: dict):
        imgs = batch["image"]
        latent, draw = self.forward_encoder(imgs, self.mask_ratio)
        loss, pred = self.decode_masked(latent, draw.ids_keep, draw.mask, draw.ids_keep.shape[1], imgs)
        return loss, {"pred": pred, "mask": draw.mask, "hidden": draw.mask}


_DEC8 = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)

register_preset(
    "mae_vit_pico_patch8",
    MAE,
    "CPU-sized MAE: ViT-Pico/8 at 64 px (96-d x 4), decoder 64-d x 2",
    encoder="vit_pico_patch8_64",
    img_size=64,
    decoder_dim=64,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "mae_vit_nano_patch8",
    MAE,
    "small-image MAE: ViT-Nano/8 at 96 px (192-d x 6), decoder 128-d x 2",
    encoder="vit_nano_patch8_96",
    img_size=96,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "mae_vit_tiny_patch16",
    MAE,
    "MAE ViT-Ti/16 (192-d x 12), decoder 256-d x 4",
    encoder="vit_tiny_patch16_224",
    decoder_dim=256,
    decoder_depth=4,
    decoder_heads=8,
)
register_preset(
    "mae_vit_small_patch16",
    MAE,
    "MAE ViT-S/16 (384-d x 12), decoder 512-d x 8",
    encoder="vit_small_patch16_224",
    **_DEC8,
)
register_preset(
    "mae_vit_base_patch16",
    MAE,
    "MAE ViT-B/16 (768-d x 12), decoder 512-d x 8 (the paper's base)",
    encoder="vit_base_patch16_224",
    **_DEC8,
)
register_preset(
    "mae_vit_large_patch16",
    MAE,
    "MAE ViT-L/16 (1024-d x 24), decoder 512-d x 8",
    encoder="vit_large_patch16_224",
    **_DEC8,
)
register_preset(
    "mae_vit_huge_patch14",
    MAE,
    "MAE ViT-H/14 (1280-d x 32), decoder 512-d x 8",
    encoder="vit_huge_patch14_224",
    **_DEC8,
)
