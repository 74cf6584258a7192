"""CoMA (Li et al. 2025): complementary masking with an adaptive model M_t and a frozen evaluation model M_{t-1}.

The paper's method section was not available; everything here follows docs/coma.md, which separates what the
abstract and captions state from mimkit's design. In short:

- Masks are drawn over units (32 px for DyViT, the patch for a plain ViT) at ``mask_ratio`` (0.6):
  ``pair`` gives two complementary views per step (view A masks a random 60 %, view B the other 40 %);
  ``cycle`` (the default, docs/ablations.md) gives one view per step from a fixed per-sample unit permutation,
  stepping so that consecutive visits (epochs) mask what was visible before, and every unit is masked at the same
  long-run frequency;
  ``random`` (the control) is MAE's i.i.d. random masking at the same ratio, one view per step.
- ``teacher: none`` trains M_t on view A (and on view B too in ``pair`` mode: every unit reconstructed once per
  step). ``copy`` / ``ema``: M_t trains on view A, a frozen copy M_{t-1}, refreshed from M_t after every optimizer
  step (copied, or moved by an exponential average with ``teacher_momentum``), reconstructs view B without gradients;
  its error is logged as ``teacher_loss``. With ``teacher_weight > 0`` M_t's predictions of the units it must
  reconstruct are also pulled towards M_{t-1}'s outputs there (where M_{t-1} saw them).
- Encoder: DyViT (masked units dropped exactly, no mask tokens) or a plain timm ViT (MAE-style dropping); an MAE
  transformer decoder over units; normalized-pixel MSE on masked units.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mimkit.masking import complementary_pair, cycle_mask, keep_positions, num_masked, random_masking
from mimkit.methods._encoders import build_encoder
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import register_preset
from mimkit.models._size import require_square
from mimkit.models.decoder import visible_token_decoder
from mimkit.models.interfaces import VisibleTokenEncoder
from mimkit.patches import masked_mse, patch_mse

MODES = ("pair", "cycle", "random")
TEACHERS = ("none", "copy", "ema")


class CoMA(MIMMethod):
    """CoMA: complementary masks over mask units, a frozen model M_{t-1} one step behind (docs/coma.md)."""

    io: VisibleTokenEncoder  # the encoder (and teacher_io the frozen one) as this method may use it (mypy-checked)
    teacher_io: VisibleTokenEncoder

    def __init__(
        self,
        encoder: str = "dyvit_base_224",
        img_size: int = 224,
        in_chans: int = 3,
        mask_ratio: float = 0.6,
        mode: str = "cycle",
        teacher: str = "none",
        teacher_momentum: float = 0.996,
        teacher_weight: float = 0.0,
        mask_seed: int = 0,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        drop_path: float = 0.0,
        encoder_args: dict | None = None,
    ):
        super().__init__()
        self.in_chans = in_chans
        img_size = require_square(img_size, "CoMA")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got '{teacher}'")
        if teacher_weight and teacher == "none":
            raise ValueError("teacher_weight needs a teacher: set teacher to copy or ema")
        self.encoder, self.encoder_args = build_encoder(encoder, img_size, drop_path, encoder_args, in_chans)
        self.encoder_name, self.img_size = encoder, img_size
        io: VisibleTokenEncoder = self.attach_interface("io", self.encoder, VisibleTokenEncoder, "CoMA")
        self.patch_size, self.grid = io.unit, io.mask_grid
        self.num_units = self.grid[0] * self.grid[1]
        if not 0 < num_masked(self.num_units, mask_ratio) < self.num_units:
            raise ValueError(f"mask_ratio {mask_ratio} masks none or all of the {self.num_units} units")
        self.mask_ratio, self.mode, self.mask_seed = mask_ratio, mode, mask_seed
        self.teacher_mode, self.teacher_momentum, self.teacher_weight = teacher, teacher_momentum, teacher_weight
        self.norm_pix_loss = norm_pix_loss
        values = self.patch_size**2 * in_chans
        self.decoder = visible_token_decoder(io, self.grid, values, decoder_dim, decoder_depth, decoder_heads)
        self.teacher = None
        if teacher != "none":
            self.teacher = nn.ModuleDict(
                {"encoder": copy.deepcopy(self.encoder), "decoder": copy.deepcopy(self.decoder)}
            ).requires_grad_(False)
            self.attach_interface("teacher_io", self.teacher["encoder"], VisibleTokenEncoder, "CoMA")

    # -- masks --------------------------------------------------------------------------------------------------
    def draw_views(self, batch: dict, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(view A mask, view B mask), each (N, units), 1 = masked; B is A's complement."""
        if self.mode == "pair":
            return complementary_pair(n, self.num_units, self.mask_ratio, device=device)
        if self.mode == "random":  # the control: MAE's i.i.d. random masking at the same ratio
            a = random_masking(n, self.num_units, self.mask_ratio, device=device).mask
            return a, 1 - a
        index = batch.get("index")  # dataset indices; a batch without them (figures, benchmarks) uses positions
        index = torch.arange(n, device=device) if index is None else torch.as_tensor(index, device=device)
        a = cycle_mask(index, batch.get("epoch", 0), self.num_units, self.mask_ratio, self.mask_seed)
        return a, 1 - a

    # -- model --------------------------------------------------------------------------------------------------
    def reconstruct(
        self, encoder: VisibleTokenEncoder, decoder: nn.Module, imgs: torch.Tensor, mask: torch.Tensor,
        n_visible: int,
    ) -> torch.Tensor:  # fmt: skip
        """Encode the ``n_visible`` unmasked units only, decode every unit: (N, units, unit_px**2 * C)."""
        ids_keep = keep_positions(mask, n_visible)
        return decoder(encoder.encode_visible(imgs, ids_keep), ids_keep)

    def forward(self, batch: dict):
        imgs = batch["image"]
        n = imgs.shape[0]
        view_a, view_b = self.draw_views(batch, n, imgs.device)
        target = self.target(imgs)
        m = num_masked(self.num_units, self.mask_ratio)
        pred = self.reconstruct(self.io, self.decoder, imgs, view_a, self.num_units - m)
        log = {}
        if self.teacher is None and self.mode == "pair":  # both views through M_t: every unit once
            pred_b = self.reconstruct(self.io, self.decoder, imgs, view_b, m)
            err_a = patch_mse(pred, target) * view_a
            loss = (err_a + patch_mse(pred_b, target) * view_b).mean()
            log["loss_view_a"] = err_a.sum().detach() / view_a.sum()
            pred = pred * view_a.unsqueeze(-1) + pred_b * view_b.unsqueeze(-1)
            predicted = torch.ones_like(view_a)
        else:
            loss = masked_mse(pred, target, view_a)
            predicted = view_a
        if self.teacher is not None:
            with torch.no_grad():
                pred_t = self.reconstruct(self.teacher_io, self.teacher["decoder"], imgs, view_b, m)
                log["teacher_loss"] = masked_mse(pred_t, target, view_b)
            if self.teacher_weight:
                loss = loss + self.teacher_weight * masked_mse(pred, pred_t, view_a)
        return loss, {"pred": pred, "mask": predicted, "hidden": view_a, "log": log}

    # -- the evaluation model -------------------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Refresh M_{t-1} from M_t *before* M_t is updated (a copy, or an exponential moving average), so that at the
        next step the frozen model holds the parameters of the step before: M_{t-1} of the paper's Fig. 3."""
        if self.teacher is None:
            return
        student: list[torch.Tensor] = [*self.encoder.parameters(), *self.decoder.parameters()]
        frozen: list[torch.Tensor] = [*self.teacher["encoder"].parameters(), *self.teacher["decoder"].parameters()]
        if self.teacher_mode == "copy":
            torch._foreach_copy_(frozen, student)
        else:
            torch._foreach_lerp_(frozen, student, 1.0 - self.teacher_momentum)

    def train(self, mode: bool = True):
        """Train mode for the student; the frozen model always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no drop path, no dropout
        return self


register_preset(
    "coma_dyvit_pico_128",
    CoMA,
    "CPU-sized CoMA: DyViT-Pico at 128 px (4x4 units of 32 px), decoder 128-d x 2",
    encoder="dyvit_pico_128",
    img_size=128,
    decoder_dim=128,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "coma_vit_pico_patch8",
    CoMA,
    "CPU-sized CoMA on ViT-Pico/8 at 64 px (8 px units), decoder 64-d x 2",
    encoder="vit_pico_patch8_64",
    img_size=64,
    decoder_dim=64,
    decoder_depth=2,
    decoder_heads=4,
)
register_preset(
    "coma_dyvit_tiny_224", CoMA, "CoMA DyViT-T at 224 px, decoder 512-d x 8", encoder="dyvit_tiny_224", img_size=224
)
register_preset(
    "coma_dyvit_small_224", CoMA, "CoMA DyViT-S at 224 px, decoder 512-d x 8", encoder="dyvit_small_224", img_size=224
)
register_preset(
    "coma_dyvit_base_224", CoMA, "CoMA DyViT-B at 224 px, decoder 512-d x 8", encoder="dyvit_base_224", img_size=224
)
register_preset(
    "coma_vit_base_patch16",
    CoMA,
    "CoMA on ViT-B/16 (16 px units), decoder 512-d x 8: the masking strategy on MAE's backbone",
    encoder="vit_base_patch16_224",
    img_size=224,
)
