"""What a pretraining method may ask of an encoder: one typed protocol per way of feeding it masked images.

A backbone supports a protocol by having its members (``isinstance`` checks them, ``typing.runtime_checkable``); a
plain timm ViT gets the two it can serve from :class:`ViTInterface`, so timm's own model and state dict stay as they
are. A method asks for the protocol it needs with :func:`encoder_interface` at construction, and an encoder that
cannot serve it is an error there that names the method, the encoder and what is missing (docs/design.md, "Encoder
interfaces").

- :class:`VisibleTokenEncoder` (MAE, CoMA, UM-MAE on a ViT): encode only the kept units, any subset in any order.
- :class:`MaskTokenEncoder` (SimMIM): every token, the masked ones replaced by a learnable token; the final map.
- :class:`UniformCompactEncoder` (UM-MAE on Swin and PVT): the kept patches of a uniform sampling, gathered into a
  compact map of a quarter of the area.
- :class:`MixedTokenEncoder` (MixMAE): stage-1 tokens of two images mixed, attention kept inside each source.
- :class:`WindowSequenceEncoder` (LoMaR): short sequences, the patches of one small window each, through blocks
  whose only sense of position is a relative position bias of their own; a timm ``Beit`` with a bias in every block
  (the ``rpbvit_*`` models) gets it from :class:`RelPosViTInterface`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MaskTokenEncoder",
    "MixedTokenEncoder",
    "UniformCompactEncoder",
    "RelPosViTInterface",
    "ViTInterface",
    "VisibleTokenEncoder",
    "WindowSequenceEncoder",
    "encoder_interface",
    "global_features",
]


@runtime_checkable
class VisibleTokenEncoder(Protocol):
    """Encodes the kept units only. ``unit`` px per unit (a patch, or DyViT's 32 px mask unit), ``mask_grid`` units
    per (row, column), ``out_dim`` channels out, ``has_cls`` whether a class token leads the output,
    ``replaces_tokens`` whether ``encode_visible`` takes ``replace`` and ``token``."""

    unit: int
    mask_grid: tuple[int, int]
    out_dim: int
    has_cls: bool
    replaces_tokens: bool

    def encode_visible(
        self,
        img: torch.Tensor,
        ids_keep: torch.Tensor,
        replace: torch.Tensor | None = None,
        token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, [1 +] K, out_dim) for the units ``ids_keep`` (N, K) (raster indices), in that order; where ``replace``
        (N, K) is 1 the unit's input token is ``token`` (UM-MAE's secondary masking)."""
        ...


@runtime_checkable
class MaskTokenEncoder(Protocol):
    """Sees every token; masked stage-1 tokens are replaced by a learnable one. ``token_px`` px per stage-1 token,
    ``token_dim`` its channels, ``out_stride`` px per output token, ``out_dim`` output channels."""

    token_px: int
    token_dim: int
    out_stride: int
    out_dim: int

    def encode_masked(self, img: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """``mask`` (N, H, W) over stage-1 tokens, 1 = replaced by ``token``: final map (N, H', W', out_dim)."""
        ...


@runtime_checkable
class UniformCompactEncoder(Protocol):
    """UM-MAE on a pyramid: ``embed_kept`` gives the stage-1 tokens of the kept patches as a compact map,
    ``forward_uniform`` encodes that map with the patches' true coordinates; ``check_size(size, compact=True)``
    raises when the compact map does not fit the windows."""

    embed_dims: list[int]
    num_features: int

    def embed_kept(self, img: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Stage-1 tokens of the kept patches ``ids`` (block order) of a ``grid`` of patches of ``img``, as a compact
        map (N, H/2, W/2, C) before any position embedding (``mimkit.masking.compact`` of the full image's tokens)."""
        ...

    def mask_token_input(self, token: torch.Tensor) -> torch.Tensor:
        """The secondary-mask token as it enters stage 1 (normed like the patch embedding, or as is)."""
        ...

    def forward_uniform(self, tokens: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Compact map (N, Hc, Wc, C) of the kept patches ``ids`` of a ``grid`` -> final map (N, Hc/8, Wc/8, C')."""
        ...

    def check_size(self, img_size, compact: bool = False) -> None:
        """Raise a ValueError when ``img_size`` (or its compact map) does not fit the encoder."""
        ...


@runtime_checkable
class MixedTokenEncoder(Protocol):
    """MixMAE: ``embed`` gives stage-1 tokens; ``forward_tokens(tokens, groups)`` runs the stages with attention
    confined to tokens of the same source (``groups``: one cell map per mixed input); ``stride`` px per cell."""

    stride: int
    num_features: int

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Stage-1 tokens of the full image, (N, H, W, C): the tokens that are mixed."""
        ...

    def forward_tokens(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Mixed tokens -> final map (S, H', W', C'), attention confined by ``groups`` (1 or S cell maps)."""
        ...


@runtime_checkable
class WindowSequenceEncoder(Protocol):
    """LoMaR: a batch of short token sequences, each the patches of one window, encoded with a class token in front
    and no absolute position. ``patch_px`` px per patch, ``grid`` patches per (row, column) of a whole image,
    ``dim`` channels."""

    patch_px: int
    grid: tuple[int, int]
    dim: int

    def set_window(self, window: int) -> None:
        """Size the position biases for sequences of ``window`` x ``window`` patches."""
        ...

    def embed_patches(self, pix: torch.Tensor) -> torch.Tensor:
        """Flattened patch pixels (S, L, p*p*C), channels first in each patch -> tokens (S, L, dim)."""
        ...

    def encode_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (S, L, dim) -> (S, 1 + L, dim): a class token prepended, every block run."""
        ...

    def whole_image_state(self) -> dict[str, torch.Tensor]:
        """The weights for whole images of ``grid`` patches (position biases widened from the window)."""
        ...

    def reset_parameters(self, bias_std: float = 0.02) -> None:
        """LoMaR's initialization of the patch embedding, the class token and the position biases."""
        ...


class ViTInterface:
    """A timm ``VisionTransformer`` (class token, fixed position embedding) seen through the protocols it can serve:
    :class:`VisibleTokenEncoder` and :class:`MaskTokenEncoder`. Holds the model, adds no parameters."""

    has_cls = True
    replaces_tokens = True

    def __init__(self, vit: Any):  # a timm VisionTransformer
        self.vit = vit
        self.unit = self.token_px = self.out_stride = vit.patch_embed.patch_size[0]
        self.mask_grid = tuple(vit.patch_embed.grid_size)
        self.out_dim = self.token_dim = vit.embed_dim

    def encode_visible(self, img, ids_keep, replace=None, token=None):
        """Patch-embed, keep ``ids_keep`` (optionally replaced by ``token``), add their positions, run the ViT."""
        from mimkit.masking import gather_tokens
        from mimkit.models.vit import vit_encode

        x = self.embed_kept(img, ids_keep)
        if replace is not None:
            w = replace.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + token.reshape(1, 1, -1).to(x.dtype) * w
        pos = gather_tokens(self.vit.pos_embed[:, 1:].expand(img.shape[0], -1, -1), ids_keep)
        return vit_encode(self.vit, x + pos)

    def embed_kept(self, img: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the kept patches ``ids_keep`` (N, K, dim). timm's patch embedding is a convolution whose
        kernel is its stride, a linear map of each patch's pixels: the kept patches' pixels are gathered and mapped,
        which is the same as embedding every patch and keeping some, for a quarter of the stem's work at MAE's ratio
        and without scattering its gradient over the dropped patches. Any other stem (padding, another size, a
        hybrid) embeds every patch first."""
        from mimkit.masking import gather_tokens
        from mimkit.patches import is_patchwise, patchify_channels_first

        pe, (h, w) = self.vit.patch_embed, img.shape[-2:]
        proj: Any = getattr(pe, "proj", None)
        if is_patchwise(proj) and proj.kernel_size[0] == proj.kernel_size[1] and getattr(pe, "flatten", False):
            p = proj.kernel_size[0]
            if h % p == 0 and w % p == 0 and (h // p, w // p) == tuple(pe.grid_size):
                pix = gather_tokens(patchify_channels_first(img, p), ids_keep)
                return pe.norm(F.linear(pix, proj.weight.flatten(1), proj.bias))
        return gather_tokens(pe(img), ids_keep)

    def encode_masked(self, img, mask, token):
        """SimMIM on a ViT: masked patch tokens replaced, every token encoded: (N, h, w, C)."""
        from mimkit.models.vit import vit_masked_tokens

        return vit_masked_tokens(self.vit, img, mask.flatten(1), token)


class RelPosViTInterface:
    """A timm ``Beit`` with a relative position bias table in every block (mimkit's ``rpbvit_*`` models) seen as a
    :class:`WindowSequenceEncoder`. Holds the model, adds no parameters."""

    def __init__(self, beit: Any):  # a timm Beit
        self.beit = beit
        self.patch_px = beit.patch_embed.patch_size[0]
        self.grid = tuple(beit.patch_embed.grid_size)
        self.dim = beit.embed_dim

    @staticmethod
    def serves(model: nn.Module) -> bool:
        """A timm Beit whose every block has its own bias table (not the shared-bias variant)."""
        from timm.models.beit import Beit

        return isinstance(model, Beit) and all(
            getattr(b.attn, "relative_position_bias_table", None) is not None for b in model.blocks
        )

    def set_window(self, window: int) -> None:
        """timm's own resizing of the bias tables; they are untrained when this is called, so its resampling
        warnings are silenced."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.beit.set_input_size(img_size=(window * self.patch_px,) * 2)

    def embed_patches(self, pix):
        """The patch-embedding convolution as the linear map it is on each patch's pixels, then its norm."""
        import torch.nn.functional as F

        proj = self.beit.patch_embed.proj
        return self.beit.patch_embed.norm(F.linear(pix, proj.weight.flatten(1), proj.bias))

    def encode_sequences(self, x):
        """Class token prepended, the blocks run (checkpointed when the model's grad checkpointing is on)."""
        from mimkit.models._checkpoint import run_blocks

        enc = self.beit
        x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return run_blocks(enc.blocks, enc.pos_drop(x), enabled=enc.grad_checkpointing)

    def whole_image_state(self):
        """A copy of the weights with every bias table widened to the whole grid by clipping the offsets never
        seen in a window to the outermost trained ones (mimkit/models/rpb_vit.py, ``expand_rel_pos_table``)."""
        from mimkit.models.rpb_vit import expand_rel_pos_table

        state = {k: v.detach().clone() for k, v in self.beit.state_dict().items()}
        for k, v in state.items():
            if k.endswith("relative_position_bias_table"):
                state[k] = expand_rel_pos_table(v, max(self.grid))
        return state

    def reset_parameters(self, bias_std: float = 0.02) -> None:
        """LoMaR's start: the patch embedding Xavier-uniform as a linear layer, the class token N(0, 0.02), and the
        bias tables truncated-normal with ``bias_std`` (Swin's init, not timm Beit's zeros: identical mask tokens
        carry no absolute position, only the bias tells them apart; docs/design.md)."""
        w = self.beit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.beit.cls_token, std=0.02)
        for blk in self.beit.blocks:
            nn.init.trunc_normal_(blk.attn.relative_position_bias_table, std=bias_std)


_NEEDS: dict[Any, str] = {
    VisibleTokenEncoder: "to encode the visible units only (a plain timm ViT or a dyvit_* model)",
    MaskTokenEncoder: "to take mask tokens at every position (a plain timm ViT, mimswin_* or mimpvt_*)",
    UniformCompactEncoder: "to encode UM-MAE's compact map (mimswin_* or mimpvt_*; a plain ViT takes the visible "
    "tokens)",
    MixedTokenEncoder: "to keep attention inside each mixed image (a mixswin_* model)",
    WindowSequenceEncoder: "with a relative position bias in every block and no absolute position embedding (one "
    "of the rpbvit_* models)",
}


def encoder_interface(encoder: nn.Module, protocol: type, method: str, name: str):
    """``encoder`` itself if it implements ``protocol``, a :class:`ViTInterface` over a timm ViT that can serve it,
    else a ValueError naming the method, the encoder and what is missing."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(encoder, protocol):
        return encoder
    if isinstance(encoder, VisionTransformer) and protocol in (VisibleTokenEncoder, MaskTokenEncoder):
        return ViTInterface(encoder)
    if protocol is WindowSequenceEncoder and RelPosViTInterface.serves(encoder):
        return RelPosViTInterface(encoder)
    raise ValueError(
        f"{method} cannot use encoder '{name}' ({type(encoder).__name__}): {method} needs an encoder "
        f"{_NEEDS.get(protocol, 'implementing ' + protocol.__name__)}; `mimkit models` lists them"
    )


def global_features(encoder: nn.Module, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """Global features of full, unmasked images through a timm encoder's ``forward_features``: (N, D). Feature maps
    (Swin, PVT, DyViT) are averaged over positions; token sequences (ViT) over the patch tokens (``pool="cls"``: the
    class token, where there is one), then normalized by the model's ``fc_norm`` where timm pools that way (a
    ``Beit``, as LoMaR's encoder: timm's own pre-logits features). One rule for a pretraining method's encoder, its
    export and a fine-tuned classifier, so that each evaluates the same features (mimkit/eval/features.py)."""
    out = encoder.forward_features(images)  # type: ignore[operator]
    if out.ndim == 4:
        return out.mean(dim=(1, 2))
    prefix = getattr(encoder, "num_prefix_tokens", 0)
    if pool == "cls" and prefix:
        return out[:, 0]
    pooled = out[:, prefix:].mean(dim=1)
    fc_norm = getattr(encoder, "fc_norm", None)
    return fc_norm(pooled) if isinstance(fc_norm, nn.Module) else pooled


def supports(encoder: nn.Module, protocol: type) -> bool:
    """Whether :func:`encoder_interface` would serve ``protocol`` for ``encoder``."""
    try:
        encoder_interface(encoder, protocol, "", "")
    except ValueError:
        return False
    return True
