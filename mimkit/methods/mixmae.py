"""MixMAE (Liu et al. 2022): the masked cells of one image are filled with the visible cells of another, the mixed
input is encoded once with attention confined to each source image, then unmixed for a dual reconstruction
(docs/methods.md section 7).

Mixing mask: cells of the encoder's total stride (32 px), ``int(cells * mask_ratio)`` taken from the partner.
Options beyond the released code are documented in docs/design.md:
- ``pairing``: ``flip`` (released code) mixes image i with image B-1-i and builds B mixed inputs, so every pair is
  encoded twice with the roles swapped and every patch of every image is predicted once per step; ``once`` encodes
  each pair a single time (B/2 mixed inputs, an odd middle image mixed with itself), so each image's hidden half is
  predicted and the encoder costs half a pass per image (the paper's efficiency argument).
- ``mask_granularity``: ``batch`` (released code: one mask per forward call and process) or ``pair`` (one mask per
  pair of images; the attention mask then carries a batch dimension and costs memory).
"""

from __future__ import annotations

import torch

from mimkit.masking import masking_from_noise, upsample_cells
from mimkit.methods._encoders import build_encoder
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models._size import require_square
from mimkit.models.decoder import TransformerDecoder
from mimkit.models.interfaces import MixedTokenEncoder
from mimkit.models.vit import mae_init_
from mimkit.patches import patch_mse

PAIRINGS = ("flip", "once")
GRANULARITIES = ("batch", "pair")


class MixMAE(MIMMethod):
    """MixMAE: two images' tokens mixed into one input, attention kept inside each source, both reconstructed."""

    io: MixedTokenEncoder  # the encoder as this method may use it (attach_interface; checked by mypy)
    decoder: TransformerDecoder

    def __init__(
        self,
        encoder: str = "mixswin_base_patch4_window14_224",
        img_size: int = 224,
        in_chans: int = 3,
        mask_ratio: float = 0.5,
        pairing: str = "flip",
        mask_granularity: str = "batch",
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got '{pairing}'")
        if mask_granularity not in GRANULARITIES:
            raise ValueError(f"mask_granularity must be one of {', '.join(GRANULARITIES)}, got '{mask_granularity}'")
        img_size = require_square(img_size, "MixMAE")
        self.encoder, self.encoder_args = build_encoder(encoder, img_size, drop_path, encoder_args, in_chans)
        self.encoder_name, self.img_size = encoder, img_size
        io: MixedTokenEncoder = self.attach_interface("io", self.encoder, MixedTokenEncoder, "MixMAE")
        self.patch_size = io.stride  # one mask cell = one decoder token = one predicted patch
        self.grid = (img_size // self.patch_size,) * 2
        cells = self.grid[0] * self.grid[1]
        self.n_mix = int(cells * mask_ratio)
        if not 0 < self.n_mix < cells:
            raise ValueError(
                f"mask_ratio {mask_ratio} mixes {self.n_mix} of {cells} cells; it must mix at least one "
                f"and keep at least one"
            )
        self.mask_ratio, self.pairing, self.mask_granularity = mask_ratio, pairing, mask_granularity
        self.norm_pix_loss = norm_pix_loss
        self.decoder = TransformerDecoder(
            io.num_features,
            self.grid,
            self.patch_size**2 * in_chans,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            cls_token=False,
        )
        mae_init_(self.decoder)

    def pair_indices(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): mixed input j holds image a[j] where the mask is 0 and image b[j] where it is 1."""
        a = torch.arange(n if self.pairing == "flip" else (n + 1) // 2, device=device)
        return a, n - 1 - a

    def draw_mask(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(1 or n, cells) mixing mask, 1 = taken from the partner; with ``pair`` granularity the two inputs of a pair
        (j and n-1-j under ``flip``) share their mask, as dual reconstruction requires."""
        cells = self.grid[0] * self.grid[1]
        rows = 1 if self.mask_granularity == "batch" else (n + 1) // 2
        noise = torch.rand(rows, cells, device=device, generator=generator)
        mask = masking_from_noise(noise, cells - self.n_mix).mask
        if rows > 1 and self.pairing == "flip":
            mask = mask[torch.minimum(torch.arange(n, device=device), n - 1 - torch.arange(n, device=device))]
        return mask

    def forward(self, batch: dict):
        imgs = batch["image"]
        n = imgs.shape[0]
        a, b = self.pair_indices(n, imgs.device)
        mask = self.draw_mask(n, imgs.device)  # (1 or S, cells)
        groups = mask.view(-1, *self.grid)
        tokens = self.io.embed(imgs)  # (N, H/4, W/4, C)
        k = tokens.shape[1] // self.grid[0]
        m_tok = upsample_cells(groups, k).unsqueeze(-1).to(tokens.dtype)
        mixed = tokens[a] * (1 - m_tok) + tokens[b] * m_tok
        feat = self.io.forward_tokens(mixed, groups)  # (S, h, w, C_last)
        z = self.decoder.embed(feat.flatten(1, 2))  # (S, cells, D)
        m = mask.unsqueeze(-1).to(z.dtype)
        token = self.decoder.mask_token.to(z.dtype)
        own = z * (1 - m) + token * m  # image a's tokens; predicts a where it was hidden (mask 1)
        partner = z * m + token * (1 - m)  # image b's tokens; predicts b where it was hidden (mask 0)
        rec = self.decoder.decode(torch.cat([own, partner]))
        pred_a, pred_b = rec.split(len(a))
        target = self.target(imgs)
        err_a = patch_mse(pred_a, target[a]) * mask
        err_b = patch_mse(pred_b, target[b]) * (1 - mask)
        loss = (err_a.sum() + err_b.sum()) / (len(a) * mask.shape[1])  # every cell of every input, once
        return loss, self.image_outputs(imgs, a, b, mask, pred_a, pred_b)

    def image_outputs(self, imgs, a, b, mask, pred_a, pred_b) -> dict:
        """Per input image: ``pred`` (its patches predicted this step, each by the branch in which it was hidden),
        ``mask`` (1 = predicted, in the loss) and ``hidden`` (hidden from it in its own mixed input); in eval mode
        also ``encoder_input``, the mixed image (normalized pixels) the encoder saw for it."""
        n, s = imgs.shape[0], len(a)
        mask = mask.expand(s, -1)
        w = mask.to(pred_a.dtype).unsqueeze(-1)
        pred = pred_a.new_zeros(n, *pred_a.shape[1:]).index_add(0, b, pred_b * (1 - w)).index_add(0, a, pred_a * w)
        covered = mask.new_zeros(n, mask.shape[1]).index_add(0, b, 1 - mask).index_add(0, a, mask)
        hidden = mask.new_zeros(n, mask.shape[1])
        hidden[b] = 1 - mask
        hidden[a] = mask  # an image that is "a" somewhere is shown as such
        out = {"pred": pred, "mask": covered, "hidden": hidden}
        if not self.training:
            p = self.patch_size
            cell = upsample_cells(mask.view(s, 1, *self.grid), p).to(imgs.dtype)
            mixed = imgs[a] * (1 - cell) + imgs[b] * cell
            seen = imgs.clone()
            seen[b] = mixed
            seen[a] = mixed
            out["encoder_input"] = seen
        return out


register_preset(
    "mixmae_swin_pico_128",
    MixMAE,
    "CPU-sized MixMAE: Swin-Pico (no shift, windows 16) at 128 px, decoder 128-d x 2",
    encoder="mixswin_pico_patch4_window16_128",
    img_size=128,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "mixmae_swin_base_224",
    MixMAE,
    "MixMAE-B: Swin-B/W14 at 224 px, mask 0.5, decoder 512-d x 8",
    encoder="mixswin_base_patch4_window14_224",
    img_size=224,
)
register_preset(
    "mixmae_swin_large_224",
    MixMAE,
    "MixMAE-L: Swin-L/W14 at 224 px, decoder 512-d x 8",
    encoder="mixswin_large_patch4_window14_224",
    img_size=224,
)
register_preset(
    "mixmae_swin_huge_224",
    MixMAE,
    "MixMAE-H: Swin-H/W14 at 224 px, decoder 512-d x 8",
    encoder="mixswin_huge_patch4_window14_224",
    img_size=224,
)
