"""UM-MAE (Li et al. 2022): uniform sampling + secondary masking + compact 2-D input, for Swin, PVT and ViT
(docs/methods.md section 4; Li et al. 2022, "Uniform Masking: Enabling MAE Pre-training for Pyramid-based
Vision Transformers with Locality").

Per sample, one 16 px patch of every 2x2 block is kept (uniform sampling, US); ``sm_ratio`` of the kept patches are
replaced by a learnable token (secondary masking, SM). Hierarchical encoders see the kept patches re-organized
into a compact map of a quarter of the area (an index gather); the encoder output is PixelShuffled back to one token
per kept patch, and a light ViT decoder with mask tokens predicts the dropped 75 %. The loss is normalized-pixel MSE
on the US-dropped patches only.

Decoder positions of the visible tokens: ``decoder_pos_order="block"`` (default) gives each token the position of the
patch it came from (the order of the compaction); ``"reference"`` reproduces the released code, which assigns the
positions of the kept patches in raster order (a mismatch for ~64 % of tokens, docs/methods.md 4.6). See docs/design.md.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.masking import (
    grid_sampling,
    kept_block_order,
    random_sampling,
    secondary_masking,
    uniform_sampling,
    upsample_cells,
)
from mimkit.methods._encoders import build_encoder
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models._size import canonical, pair, size_text
from mimkit.models.decoder import TransformerDecoder, visible_token_decoder
from mimkit.models.interfaces import UniformCompactEncoder, VisibleTokenEncoder
from mimkit.models.vit import mae_init_


class UMMAE(MIMMethod):
    """UM-MAE: uniform sampling + secondary masking, a compact map for pyramids (or visible tokens for a ViT)."""

    # the encoder as this method may use it (attach_interface; checked by mypy): which one is ``self.vit``'s choice
    io: VisibleTokenEncoder | UniformCompactEncoder
    to_decoder: nn.Module

    def __init__(
        self,
        encoder: str = "mimswin_tiny_patch4_window16_256",
        img_size: int = 256,
        in_chans: int = 3,
        sm_ratio: float = 0.25,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
        decoder_pos_order: str = "block",
        sampling: str = "uniform",
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        if sampling not in ("uniform", "grid", "random"):
            raise ValueError("sampling must be 'uniform', 'grid' or 'random'")
        if decoder_pos_order not in ("block", "reference"):
            raise ValueError("decoder_pos_order must be 'block' or 'reference'")
        if not 0.0 <= sm_ratio < 1.0:
            raise ValueError(f"sm_ratio must be in [0, 1), got {sm_ratio}")
        self.encoder, self.encoder_args = build_encoder(encoder, img_size, drop_path, encoder_args, in_chans)
        self.encoder_name, self.img_size = encoder, canonical(img_size)
        height, width = pair(img_size)
        self.sm_ratio, self.norm_pix_loss, self.decoder_pos_order = sm_ratio, norm_pix_loss, decoder_pos_order
        # a pyramid encodes the compact map (UniformCompactEncoder); a plain ViT takes the kept tokens as a sequence
        self.vit = not isinstance(self.encoder, UniformCompactEncoder)
        io = self.attach_interface(
            "io", self.encoder, VisibleTokenEncoder if self.vit else UniformCompactEncoder, "UM-MAE"
        )
        vis, compact = cast(VisibleTokenEncoder, io), cast(UniformCompactEncoder, io)  # the one self.vit names
        if self.vit and sm_ratio > 0 and not vis.replaces_tokens:
            raise ValueError(
                f"UM-MAE's secondary masking replaces kept tokens by a mask token, which encoder '{encoder}' cannot "
                "take; use sm_ratio=0 or a mimswin_* / mimpvt_* / plain ViT encoder"
            )
        self.sampling = sampling
        if sampling != "uniform" and not self.vit:
            raise ValueError(
                f"sampling='{sampling}' keeps an uneven number of patches per window; only a plain ViT "
                "encoder can take it (pyramid encoders need sampling='uniform')"
            )
        self.patch_size = vis.unit if self.vit else 16
        need = 2 * self.patch_size if self.vit else 64
        for side in (height, width):
            if side % need:
                raise ValueError(
                    f"UM-MAE needs image sides divisible by {need} px (2x2 blocks of {self.patch_size} px "
                    f"patches{'' if self.vit else ', compact map of stride 32'}); got {size_text(img_size)}, try "
                    f"{max(need, side // need * need)} or {(side // need + 1) * need} for {side}"
                )
        if not self.vit:
            compact.check_size(img_size, compact=True)
        self.grid = (height // self.patch_size, width // self.patch_size)
        first_dim = vis.out_dim if self.vit else compact.embed_dims[0]
        self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, first_dim))
        nn.init.normal_(self.vis_mask_token, std=0.02)
        if self.vit:
            self.to_decoder = nn.Identity()
            values = self.patch_size**2 * in_chans
            self.decoder = visible_token_decoder(vis, self.grid, values, decoder_dim, decoder_depth, decoder_heads)
        else:
            self.to_decoder = embed = nn.Linear(compact.num_features, 4 * decoder_dim)
            nn.init.xavier_uniform_(embed.weight)  # the released decoder_embed's init
            nn.init.zeros_(embed.bias)
            self.decoder = TransformerDecoder(
                None,
                self.grid,
                self.patch_size**2 * in_chans,
                decoder_dim,
                decoder_depth,
                decoder_heads,
                cls_token=False,
            )
            mae_init_(self.decoder)

    def draw_masks(self, n: int, device):
        """(dropped mask (N, L), kept patch ids (N, L/4) in block order, secondary mask (N, L/4) over ids)."""
        if self.sampling == "uniform":
            us = uniform_sampling(n, self.grid, device=device)
            ids = kept_block_order(us, self.grid)
        else:
            us = (
                grid_sampling(n, self.grid, device)
                if self.sampling == "grid"
                else random_sampling(n, self.grid, device)
            )
            ids = torch.nonzero(us == 0)[:, 1].view(n, -1)  # raster order (no compaction for ViT)
        sm = secondary_masking(ids.shape[1], n, self.sm_ratio, device=device)
        return us, ids, sm

    def encode(self, imgs: torch.Tensor, ids: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
        """Encoder output as one token per kept patch, in the order of ``ids`` (plus a cls token for ViT)."""
        if self.vit:
            return cast(VisibleTokenEncoder, self.io).encode_visible(imgs, ids, sm, self.vis_mask_token)
        enc = cast(UniformCompactEncoder, self.io)
        kept = enc.embed_kept(imgs, ids, self.grid)  # (N, H1/2, W1/2, C): stage-1 tokens of the kept patches
        k = kept.shape[1] // (self.grid[0] // 2)
        w = sm.view(sm.shape[0], self.grid[0] // 2, self.grid[1] // 2)
        w = upsample_cells(w, k).unsqueeze(-1).to(kept.dtype)
        kept = kept * (1 - w) + enc.mask_token_input(self.vis_mask_token).to(kept.dtype) * w
        feat = enc.forward_uniform(kept, ids, self.grid)  # (N, h, w, C_last), h = rows / 4
        x = self.to_decoder(feat).permute(0, 3, 1, 2)
        x = F.pixel_shuffle(x, 2)  # (N, D, rows/2, cols/2): one token per kept patch, block order
        return x.flatten(2).transpose(1, 2)

    def decoder_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The grid position the decoder gives the j-th encoder token (which comes from patch ids[j]): with "block"
        that patch's own position; "reference" assigns the kept positions in raster order."""
        return ids if self.decoder_pos_order == "block" else ids.sort(dim=1).values

    def forward(self, batch: dict):
        imgs = batch["image"]
        n = imgs.shape[0]
        us, ids, sm = self.draw_masks(n, imgs.device)
        latent = self.encode(imgs, ids, sm)
        loss, pred = self.decode_masked(latent, self.decoder_positions(ids), us, ids.shape[1], imgs)
        secondary = torch.zeros_like(us).scatter(1, ids, sm)
        return loss, {"pred": pred, "mask": us, "hidden": us + secondary, "secondary": secondary}


_DEC2 = dict(decoder_dim=512, decoder_depth=2, decoder_heads=16)
register_preset(
    "umae_swin_pico_128",
    UMMAE,
    "CPU-sized UM-MAE: Swin-Pico at 128 px, decoder 128-d x 1",
    encoder="mimswin_pico_patch4_window16_128",
    img_size=128,
    decoder_dim=128,
    decoder_depth=1,
    decoder_heads=4,
)
register_preset(
    "umae_pvt_pico_128",
    UMMAE,
    "CPU-sized UM-MAE: PVT-Pico at 128 px, decoder 128-d x 1",
    encoder="mimpvt_pico_128",
    img_size=128,
    decoder_dim=128,
    decoder_depth=1,
    decoder_heads=4,
)
register_preset(
    "umae_vit_pico_patch8",
    UMMAE,
    "CPU-sized UM-MAE on ViT-Pico/8 at 64 px (the pilot, scaled down)",
    encoder="vit_pico_patch8_64",
    img_size=64,
    decoder_dim=64,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "umae_vit_nano_patch8",
    UMMAE,
    "CPU-sized UM-MAE on ViT-Nano/8 at 64 px (the masking ablation)",
    encoder="vit_nano_patch8_96",
    img_size=64,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "umae_swin_tiny_256",
    UMMAE,
    "UM-MAE Swin-T, 256 px (compact 128), window 16/8, decoder 512-d x 2",
    encoder="mimswin_tiny_patch4_window16_256",
    img_size=256,
    **_DEC2,
)
register_preset(
    "umae_swin_base_256",
    UMMAE,
    "UM-MAE Swin-B, 256 px, decoder 512-d x 2",
    encoder="mimswin_base_patch4_window16_256",
    img_size=256,
    **_DEC2,
)
register_preset(
    "umae_swin_large_256",
    UMMAE,
    "UM-MAE Swin-L, 256 px, position MLP 64, decoder 512-d x 8",
    encoder="mimswin_large_patch4_window16_256",
    img_size=256,
    decoder_dim=512,
    decoder_depth=8,
    decoder_heads=16,
)
register_preset(
    "umae_pvt_small_256",
    UMMAE,
    "UM-MAE PVT-S, 256 px, SR ratios 4-2-1-1 on compact input, dec 512 x 2",
    encoder="mimpvt_small_256",
    img_size=256,
    **_DEC2,
)
register_preset(
    "umae_vit_base_patch16",
    UMMAE,
    "UM-MAE pilot on ViT-B/16 at 224 px, decoder 512-d x 2",
    encoder="vit_base_patch16_224",
    img_size=224,
    **_DEC2,
)
