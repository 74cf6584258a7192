"""SimMIM (Xie et al. 2021): learnable mask tokens inside the encoder, a linear head + PixelShuffle, L1 on masked
pixels (docs/methods.md section 3). For Swin, PVT and ViT; the baseline UM-MAE is measured against.

Mask cells of ``mask_unit`` px (32) at ``mask_ratio`` (0.6), exactly ceil(ratio x cells) per sample. UM-MAE's own
SimMIM baseline used 16 px cells at 0.75: ``--model-arg mask_unit=16 --mask-ratio 0.75`` (recipe
``simmim_swin_tiny_ummae_baseline``). Optimizer conventions follow the SimMIM code: lr = blr x batch / 512, AdamW
betas (0.9, 0.999), gradient clipping at 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.masking import block_mask
from mimkit.methods._encoders import build_encoder
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models._size import canonical, pair, size_text
from mimkit.models.interfaces import MaskTokenEncoder
from mimkit.patches import patchify


class SimMIM(MIMMethod):
    """SimMIM: mask tokens inside any MaskTokenEncoder, a linear head + PixelShuffle, L1 on masked pixels."""

    lr_base_batch = 512
    betas = (0.9, 0.999)
    default_grad_clip = 5.0
    # SimMIM's released optimizer setup: no weight decay on the mask token and the relative position tables / bias
    # MLP, besides timm's rule for biases and norms (1-D parameters)
    no_decay_names = ("mask_token", "relative_position_bias_table", "pos_mlp")
    io: MaskTokenEncoder  # the encoder as this method may use it (attach_interface; checked by mypy)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """timm's no-decay rule plus SimMIM's: no weight decay on the mask token and the position-bias tables / MLP."""
        from timm.optim import param_groups_weight_decay

        skip = {n for n, _ in self.named_parameters() if any(key in n for key in self.no_decay_names)}
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=skip)

    def __init__(
        self,
        encoder: str = "mimswin_tiny_patch4_window16_256",
        img_size: int = 256,
        in_chans: int = 3,
        mask_ratio: float = 0.6,
        mask_unit: int = 32,
        norm_pix_loss: bool = False,
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.encoder, self.encoder_args = build_encoder(encoder, img_size, drop_path, encoder_args, in_chans)
        self.encoder_name, self.img_size = encoder, canonical(img_size)
        height, width = pair(img_size)
        self.mask_ratio, self.mask_unit, self.norm_pix_loss = mask_ratio, mask_unit, norm_pix_loss
        io: MaskTokenEncoder = self.attach_interface("io", self.encoder, MaskTokenEncoder, "SimMIM")
        self.patch_size, self.stride, dim0, dim_last = io.token_px, io.out_stride, io.token_dim, io.out_dim
        if mask_unit % self.patch_size or height % mask_unit or width % mask_unit:
            raise ValueError(
                f"mask_unit ({mask_unit} px) must be a multiple of the token size ({self.patch_size} px) "
                f"and divide the image size ({size_text(img_size)})"
            )
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim0))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim_last, self.stride**2 * in_chans)  # a 1x1 conv on the final map

    def forward(self, batch: dict):
        imgs = batch["image"]
        n = imgs.shape[0]
        mask = block_mask(n, self.grid, self.mask_unit // self.patch_size, self.mask_ratio, device=imgs.device)
        feat = self.io.encode_masked(imgs, mask.view(n, *self.grid), self.mask_token)
        rec = F.pixel_shuffle(self.head(feat).permute(0, 3, 1, 2), self.stride)  # (N, 3, H, W)
        pred = patchify(rec, self.patch_size)
        per_patch = (pred.float() - self.target(imgs).float()).abs().mean(dim=-1)
        loss = (per_patch * mask).sum() / (mask.sum() + 1e-5)
        return loss, {"pred": pred, "mask": mask, "hidden": mask}


register_preset(
    "simmim_swin_pico_128",
    SimMIM,
    "CPU-sized SimMIM: Swin-Pico at 128 px, 32 px cells at 0.6",
    encoder="mimswin_pico_patch4_window16_128",
    img_size=128,
)
register_preset(
    "simmim_pvt_pico_128",
    SimMIM,
    "CPU-sized SimMIM: PVT-Pico at 128 px, 32 px cells at 0.6",
    encoder="mimpvt_pico_128",
    img_size=128,
)
register_preset(
    "simmim_vit_pico_patch8",
    SimMIM,
    "CPU-sized SimMIM on ViT-Pico/8 at 64 px, 16 px cells at 0.6",
    encoder="vit_pico_patch8_64",
    img_size=64,
    mask_unit=16,
)
register_preset(
    "simmim_swin_tiny_256",
    SimMIM,
    "SimMIM Swin-T (mimkit's UM-MAE Swin, window 16) at 256 px",
    encoder="mimswin_tiny_patch4_window16_256",
    img_size=256,
)
register_preset(
    "simmim_swin_base_256",
    SimMIM,
    "SimMIM Swin-B (window 16) at 256 px",
    encoder="mimswin_base_patch4_window16_256",
    img_size=256,
)
register_preset("simmim_pvt_small_256", SimMIM, "SimMIM PVT-S at 256 px", encoder="mimpvt_small_256", img_size=256)
register_preset(
    "simmim_vit_base_patch16",
    SimMIM,
    "SimMIM ViT-B/16 at 224 px (fixed sin-cos positions)",
    encoder="vit_base_patch16_224",
    img_size=224,
)
register_preset(
    "simmim_mixswin_pico_128",
    SimMIM,
    "CPU-sized SimMIM on MixMAE's Swin-Pico (no shift, windows 16), 128 px: the side-by-side baseline of MixMAE",
    encoder="mixswin_pico_patch4_window16_128",
    img_size=128,
)
register_preset(
    "simmim_mixswin_base_224",
    SimMIM,
    "SimMIM on MixMAE's Swin-B/W14 at 224 px: the side-by-side baseline of MixMAE",
    encoder="mixswin_base_patch4_window14_224",
    img_size=224,
)
