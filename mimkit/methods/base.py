"""What every pretraining method provides to the trainer, evaluation, export and visualization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from mimkit.masking import flat_rows, gather_tokens
from mimkit.models.interfaces import global_features
from mimkit.patches import masked_mse, normalized_target, patchify


class MIMMethod(nn.Module):
    """A masked-image-modeling method: ``forward(batch) -> (loss, outputs)``.

    ``batch`` is a dict with at least ``"image"`` (N, C, H, W), normalized. ``outputs`` is a dict of tensors the
    method chooses; patch-reconstruction methods return ``pred`` (N, L, p*p*C; in training MAE and UM-MAE fill the
    masked positions only, ``decode_masked``), ``mask`` (N, L; 1 = in the loss) and ``hidden`` (N, L; 1 = not shown to
    the encoder), which is what ``mimkit.viz`` draws (in eval mode); an optional ``log``
    dict of scalar tensors is averaged and logged by the trainer.

    Class attributes carry the optimizer conventions of the method's paper, so the trainer never asks which
    method it runs.
    """

    lr_base_batch: int = 256  # lr = blr * effective_batch / lr_base_batch
    betas: tuple[float, float] = (0.9, 0.95)
    default_grad_clip: float | None = None

    encoder: nn.Module
    decoder: nn.Module  # where there is one (``decode_masked``)
    encoder_name: str
    encoder_args: dict
    img_size: int | tuple[int, int]  # an int for squares (mimkit/models/_size.py, canonical)
    patch_size: int
    in_chans: int = 3
    norm_pix_loss: bool = False

    def attach_interface(self, attr: str, encoder: nn.Module, protocol: type, method: str):
        """Keep ``encoder`` seen through ``protocol`` (mimkit/models/interfaces.py) as ``self.<attr>``, without
        registering it as a submodule (it is the encoder itself or a ViTInterface over it, whose weights the
        encoder already holds); a clear ValueError when the encoder cannot serve the protocol."""
        from mimkit.models.interfaces import encoder_interface

        view = encoder_interface(encoder, protocol, method, getattr(self, "encoder_name", type(encoder).__name__))
        object.__setattr__(self, attr, view)
        return view

    def param_groups(self, weight_decay: float) -> list[dict]:
        """No weight decay on 1-D parameters and biases (timm's rule, as in the MAE family's pretraining)."""
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=())

    def decode_masked(
        self, latent: torch.Tensor, where: torch.Tensor, mask: torch.Tensor, visible: int, imgs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, pred) of a decoder ``self.decoder`` (mimkit/models/decoder.py) given the encoder tokens ``latent``
        of the grid positions ``where`` (N, G), scored on the positions where ``mask`` (N, L) is 1, all but
        ``visible`` of every row (a host number, so no device value is read back).

        In training the decoder's last block and head run at the masked positions only (``at=``): the loss never
        reads the others, so loss and gradients are those of decoding every position, for a quarter less of the last
        block at MAE's ratio; ``pred`` then holds the masked positions' predictions (detached) and zeros elsewhere.
        In evaluation every position is predicted, as the visualization shows them all (docs/design.md)."""
        if not self.training or visible >= mask.shape[1]:  # evaluation, or nothing masked (a loss of 0, as before)
            pred = self.decoder(latent, where)
            return masked_mse(pred, self.target(imgs), mask), pred
        at = torch.argsort(mask, dim=1, descending=True, stable=True)[:, : mask.shape[1] - visible]
        part = self.decoder(latent, where, at)
        loss = F.mse_loss(part.float(), self.target(imgs, at).float())  # every row scored: patch_mse(...).mean()
        n, length, d = *mask.shape, part.shape[-1]
        pred = part.new_zeros(n * length, d).index_copy_(0, flat_rows(at, length), part.detach().reshape(-1, d))
        return loss, pred.view(n, length, d)

    def target(self, imgs: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction target: patchified images (N, L, p*p*C), per-patch normalized when ``norm_pix_loss``; with
        ``at`` (N, M) the patches at those positions only (N, M, p*p*C), normalized after the gather."""
        patches = patchify(imgs, self.patch_size)
        if at is not None:
            patches = gather_tokens(patches, at)
        return normalized_target(patches) if self.norm_pix_loss else patches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the encoder's and decoder's blocks (timm's convention): less memory, about
        one more forward pass of compute; the same loss and gradients."""
        from mimkit.models._checkpoint import set_grad_checkpointing

        set_grad_checkpointing(self, enable)

    def before_optimizer_step(self) -> None:
        """Called by the trainer right before every applied optimizer step (the gradients are final); nothing by
        default."""

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step (e.g. to refresh a frozen model); nothing by default."""

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Global features of full, unmasked images: (N, D), by the rule of ``global_features``
        (mimkit/models/interfaces.py): feature maps averaged over positions, token sequences over the patch tokens
        (``pool="cls"``: the class token)."""
        return global_features(self.encoder, images, pool)

    def export_encoder(self) -> tuple[dict[str, torch.Tensor], str, dict]:
        """(state dict with timm key names, timm model name, kwargs for ``timm.create_model``)."""
        state = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        return state, self.encoder_name, dict(self.encoder_args)

    def describe(self) -> dict:
        """Parameter counts: the encoder's and the whole method's."""
        n_enc = sum(p.numel() for p in self.encoder.parameters())
        n_all = sum(p.numel() for p in self.parameters())
        return {"encoder_params": n_enc, "total_params": n_all}
