"""LoMaR (Chen et al. 2022): masked reconstruction inside small local windows (docs/methods.md section 5).

Per image, ``num_windows`` windows of ``window_size`` x ``window_size`` patches; inside each window ``mask_ratio`` of
the patches are replaced by a learned mask token; every window is one short sequence (class token + K*K tokens) through
a ViT with a relative position bias in every block and no absolute position embedding; a LayerNorm + Linear head
predicts the pixels of every token; normalized-pixel MSE on the masked ones. Everything outside the windows is
discarded, so the encoder's cost per image does not grow with the resolution.

Window sampling (``window_sampling``):
- ``image`` (default, as the paper describes): every image draws its own windows; row offsets of one image's windows
  are distinct, and so are column offsets (a random permutation of each, paired), as in the released sampler.
- ``batch``: one draw of window offsets for the whole batch, every image gets the same windows.
- ``reference``: the released code's effective behaviour: one draw per batch, and image i gets window (i mod K),
  K times over, each copy with its own in-window mask (docs/methods.md 5.2).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from mimkit.masking import gather_tokens, masking_from_noise, window_offsets, window_patch_ids
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models import create_encoder
from mimkit.models._size import canonical, size_text
from mimkit.models.interfaces import WindowSequenceEncoder, global_features
from mimkit.models.vit import mae_init_
from mimkit.patches import masked_mse, patchify_channels_first

WINDOW_SAMPLING = ("image", "batch", "reference")


class LoMaR(MIMMethod):
    """LoMaR: MAE-style reconstruction inside a few random local windows, encoder over visible and mask tokens."""

    windows: WindowSequenceEncoder  # the encoder as this method may use it (attach_interface; checked by mypy)
    _full: tuple[tuple, nn.Module] | None

    def __init__(
        self,
        encoder: str = "rpbvit_base_patch16_224",
        img_size: int = 224,
        in_chans: int = 3,
        window_size: int = 7,
        num_windows: int = 4,
        mask_ratio: float = 0.8,
        window_sampling: str = "image",
        norm_pix_loss: bool = True,
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        if window_sampling not in WINDOW_SAMPLING:
            raise ValueError(f"window_sampling must be one of {', '.join(WINDOW_SAMPLING)}, got '{window_sampling}'")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder_name = encoder
        self.img_size = canonical(img_size)
        channels = {"in_chans": in_chans} if in_chans != 3 else {}
        self.encoder_args = {"img_size": self.img_size, **channels, **(encoder_args or {})}
        enc = create_encoder(encoder, drop_path_rate=drop_path, **self.encoder_args)
        self.encoder = enc
        # the classifier-side norm (timm Beit's fc_norm with average pooling) is not in the pretraining loss: frozen,
        # so that every trainable parameter has a gradient at every step, as DistributedDataParallel requires
        for p in getattr(enc, "fc_norm", nn.Identity()).parameters():
            p.requires_grad_(False)
        windows: WindowSequenceEncoder = self.attach_interface("windows", enc, WindowSequenceEncoder, "LoMaR")
        self.patch_size = windows.patch_px
        self.grid = windows.grid
        if window_size > min(self.grid):
            raise ValueError(
                f"window_size {window_size} does not fit the {self.grid[0]}x{self.grid[1]} patch grid of "
                f"{size_text(self.img_size)} images; use window_size <= {min(self.grid)} or a larger --img-size"
            )
        # the encoder runs on one window at a time: its bias tables cover exactly the window's offsets
        windows.set_window(window_size)
        self.window_size = window_size
        self.num_windows = num_windows
        self.n_mask = round(mask_ratio * window_size**2)
        if not 0 < self.n_mask < window_size**2:
            raise ValueError(
                f"mask_ratio {mask_ratio} leaves no visible or no masked patch in a {window_size}x{window_size} window"
            )
        self.mask_ratio = mask_ratio
        self.window_sampling = window_sampling
        self.norm_pix_loss = norm_pix_loss
        dim = windows.dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pred_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, self.patch_size**2 * in_chans)
        mae_init_(self)
        windows.reset_parameters(bias_std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self._full = None  # whole-image copy of the encoder for features, built on demand

    # -- windows ------------------------------------------------------------------------------------------------
    def draw_windows(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raster patch indices (N, num_windows, K*K) of every image's windows, each window in raster order."""
        k, nw = self.window_size, self.num_windows
        if self.window_sampling == "image":
            rows, cols = window_offsets(batch_size, self.grid, k, nw, device, generator)
        else:
            rows, cols = window_offsets(1, self.grid, k, nw, device, generator)
            rows, cols = rows.expand(batch_size, -1), cols.expand(batch_size, -1)
            if self.window_sampling == "reference":
                pick = (torch.arange(batch_size, device=device) % nw).view(-1, 1).expand(-1, nw)
                rows, cols = rows.gather(1, pick), cols.gather(1, pick)
        return window_patch_ids(rows, cols, self.grid, k)

    def draw_masks(self, num_sequences: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(S, K*K) in-window masks, 1 = replaced by the mask token; exactly ``round(ratio * K*K)`` per window."""
        noise = torch.rand(num_sequences, self.window_size**2, device=device, generator=generator)
        return masking_from_noise(noise, self.window_size**2 - self.n_mask).mask

    # -- model ----------------------------------------------------------------------------------------------------
    def embed_windows(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Patch embeddings of the windows only: (N * num_windows, K*K, C). The patch-embedding convolution is a
        linear map of each patch's pixels, so the pixels outside the windows are never touched."""
        pix = patchify_channels_first(imgs, self.patch_size)
        pix = gather_tokens(pix, ids.flatten(1)).view(-1, ids.shape[-1], pix.shape[-1])
        return self.windows.embed_patches(pix)

    def encode_windows(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Window token sequences with masked tokens replaced -> predictions for every window token (S, K*K, p*p*C)."""
        w = mask.unsqueeze(-1).to(tokens.dtype)
        x = self.windows.encode_sequences(tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w)
        return self.pred(self.pred_norm(x[:, 1:]))

    def forward(self, batch: dict):
        imgs = batch["image"]
        n = imgs.shape[0]
        ids = self.draw_windows(n, imgs.device)  # (N, W, K*K)
        mask = self.draw_masks(n * self.num_windows, imgs.device)  # (N*W, K*K)
        pred = self.encode_windows(self.embed_windows(imgs, ids), mask)
        target = self.target(imgs, ids.flatten(1)).view_as(pred)
        loss = masked_mse(pred, target, mask)
        return loss, self.image_outputs(pred, mask, ids)

    def image_outputs(self, pred: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> dict:
        """Window outputs scattered onto the image's patch grid (where windows overlap, the later window wins):
        ``pred``, ``mask`` (in the loss), ``secondary`` (mask token shown), ``hidden`` (not seen by the encoder) and
        ``outside`` (in no window: neither seen nor predicted)."""
        n = ids.shape[0]
        length = self.grid[0] * self.grid[1]
        flat = ids.reshape(n, -1)
        full = pred.new_zeros(n, length, pred.shape[-1]).scatter(
            1, flat.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred.reshape(n, -1, pred.shape[-1])
        )
        masked = mask.new_zeros(n, length).scatter(1, flat, mask.reshape(n, -1))
        inside = mask.new_zeros(n, length).scatter(1, flat, torch.ones_like(flat, dtype=mask.dtype))
        return {
            "pred": full,
            "mask": masked,
            "secondary": masked,
            "hidden": 1 - inside + masked,
            "outside": 1 - inside,
            "window_ids": ids,
        }

    # -- features and export: the whole image, global attention ---------------------------------------------------
    def full_image_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights for whole images of ``img_size``: bias tables widened by clipping offsets."""
        return self.windows.whole_image_state()

    def export_encoder(self):
        """The encoder as a whole-image timm model (bias tables expanded from the window to the full grid)."""
        return self.full_image_state(), self.encoder_name, dict(self.encoder_args)

    def full_encoder(self) -> nn.Module:
        """A whole-image copy of the encoder with the current weights (kept outside the module tree, refreshed when
        the weights changed)."""
        version = sum(p._version for p in self.encoder.parameters())
        first = next(self.encoder.parameters())
        key = (version, first.device, first.dtype)
        if self._full is None or self._full[0] != key:
            full = (
                self._full[1]
                if self._full is not None
                else timm.create_model(self.encoder_name, pretrained=False, num_classes=0, **self.encoder_args)
            )
            full.load_state_dict(self.full_image_state())
            full.to(device=key[1], dtype=key[2]).eval()
            self._full = (key, full)
        return self._full[1]

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Global features from the whole-image copy of the encoder: class token or pooled patch tokens."""
        return global_features(self.full_encoder(), images, pool)  # a timm Beit over the whole image


register_preset(
    "lomar_vit_pico_patch8",
    LoMaR,
    "CPU-sized LoMaR: relative-position ViT-Pico/8 at 64 px, 4 windows of 4x4 patches",
    encoder="rpbvit_pico_patch8_64",
    img_size=64,
    window_size=4,
)
register_preset(
    "lomar_vit_nano_patch8",
    LoMaR,
    "small-image LoMaR: relative-position ViT-Nano/8 at 96 px, 4 windows "
    "of 5x5 patches (fits grids from 5x5, i.e. 40 px)",
    encoder="rpbvit_nano_patch8_96",
    img_size=96,
    window_size=5,
)
register_preset(
    "lomar_vit_small_patch16", LoMaR, "LoMaR ViT-S/16, 4 windows of 7x7 patches", encoder="rpbvit_small_patch16_224"
)
register_preset(
    "lomar_vit_base_patch16",
    LoMaR,
    "LoMaR ViT-B/16, 4 windows of 7x7 patches, 80 % masked (the paper's base)",
    encoder="rpbvit_base_patch16_224",
)
register_preset(
    "lomar_vit_large_patch16", LoMaR, "LoMaR ViT-L/16, 4 windows of 7x7 patches", encoder="rpbvit_large_patch16_224"
)
