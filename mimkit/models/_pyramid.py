"""What the pyramid encoders (Swin, PVT, MixSwin, DyViT) share: timm's classifier API and model building,
initialization, SimMIM's masked forward."""

from __future__ import annotations

from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn

from mimkit.masking import compact
from mimkit.patches import is_patchwise


def pyramid_cfg(img_size: int, first_conv: str) -> dict:
    """timm's pretrained-config dict for a pyramid encoder at ``img_size`` (ImageNet mean/std, bicubic)."""
    return dict(
        num_classes=1000,
        input_size=(3, img_size, img_size),
        first_conv=first_conv,
        classifier="head",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bicubic",
        crop_pct=0.9,
        license="apache-2.0",
    )


def create_pyramid(cls, variant: str, pretrained: bool, arch: dict, **kwargs):
    """timm's ``build_model_with_cfg`` for the registered pyramid encoder ``variant`` of class ``cls``: the
    architecture ``arch`` updated by ``kwargs``; ``features_only`` gives the four stage maps (strides 4 to 32) through
    the model's own getter."""
    from timm.models import build_model_with_cfg

    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3))
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **{**arch, **kwargs})


def he_conv_(weight: torch.Tensor, bias: torch.Tensor | None, fan_out: int) -> None:
    """normal(0, sqrt(2 / fan_out)) weights, zero bias: the released codes' convolution init."""
    with torch.no_grad():
        weight.normal_(0.0, (2.0 / fan_out) ** 0.5)
        if bias is not None:
            bias.zero_()


class PyramidEncoder(nn.Module):
    """Subclasses provide ``embed(img) -> (B, H, W, C)``, ``forward_tokens(tokens) -> final normed map``,
    ``stage_outputs(img) -> (final normed map, [per-stage NHWC maps])`` and set ``num_features`` and ``head``."""

    num_features: int
    embed_dims: list[int]
    patch_size: int
    head: nn.Module
    patch_embed: Any  # the stem: a module with a ``proj`` convolution
    stages: Any  # nn.ModuleList of the subclass's stage modules
    group_stem: str = r"^patch_embed"  # regex of the stem (lr-decay group 0)
    group_merge: str = "downsample"  # name of a stage's merge module: it joins that stage's first block
    grad_checkpointing: bool = False

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Image -> stage-1 tokens (B, H, W, C); every subclass has its own."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 tokens -> the final normed map; every subclass has its own."""
        raise NotImplementedError

    def stage_outputs(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image -> (final normed map, [per-stage NHWC maps]); every subclass has its own."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's API: recompute each block's activations in the backward instead of keeping them."""
        from mimkit.models._checkpoint import set_grad_checkpointing

        self.grad_checkpointing = enable
        set_grad_checkpointing(self, enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay: blocks counted across stages; a stage's patch merge belongs to that
        stage's first block (the MixMIM / timm Swin rule)."""
        return dict(
            stem=self.group_stem,
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (rf"^stages\.(\d+)\.{self.group_merge}", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def released_init(self) -> None:
        """The initialization of the released UM-MAE (Swin, PVT) and MixMAE code: Xavier-uniform Linear layers,
        LayerNorm (1, 0), He-normal convolutions (std sqrt(2 / fan_out), fan_out = k * k * out channels), zero biases;
        the patch embedding Xavier-uniform like a Linear layer; the position-bias MLP's layers, 1x1 convolutions
        there, by the convolution rule (docs/design.md, "Initialization")."""
        from mimkit.models.layers import PositionBiasMLP
        from mimkit.models.vit import mae_init_

        mae_init_(self)  # Linear and LayerNorm as in MAE
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                he_conv_(m.weight, m.bias, m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups)
            elif isinstance(m, PositionBiasMLP):
                for fc in (m.fc1, m.fc2):
                    he_conv_(fc.weight, fc.bias, fc.out_features)
        stem = self.stem_conv()
        nn.init.xavier_uniform_(stem.weight.view(stem.weight.shape[0], -1))

    def stem_conv(self) -> nn.Conv2d:
        """The first patch-embedding convolution."""
        return self.patch_embed.proj

    @staticmethod
    def init_weights(m: nn.Module) -> None:
        """Trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0): the init of DyViT."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def embed_kept(self, img: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """UM-MAE: stage-1 tokens of the kept patches ``ids`` (block order) of a ``grid`` of patches, as a compact map
        (``compact`` of ``embed(img)``). When the stem embeds every stem patch on its own (a convolution whose kernel
        is its stride and divides a grid cell; ``embed`` adds only per-token work after it), the kept pixels are
        compacted first and embedded: the same values for a quarter of the stem's work and of its backward, which
        would otherwise scatter the gradient back over the whole image. Any other stem embeds the whole image."""
        conv = self.stem_conv()
        cell = (img.shape[-2] // grid[0], img.shape[-1] // grid[1])
        if is_patchwise(conv) and all(c % s == 0 for c, s in zip(cell, conv.stride)):
            return self.embed(compact(img.permute(0, 2, 3, 1), ids, grid).permute(0, 3, 1, 2))
        return compact(self.embed(img), ids, grid)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Full-resolution image -> normalized final map (B, H/32, W/32, C)."""
        return self.forward_tokens(self.embed(img))  # (B, H/32, W/32, C)

    # mimkit.models.interfaces.MaskTokenEncoder (SimMIM): a subclass that cannot take mask tokens sets
    # ``encode_masked = None``
    @property
    def token_px(self) -> int:
        return self.patch_size

    @property
    def token_dim(self) -> int:
        return self.embed_dims[0]

    @property
    def out_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.embed_dims) - 1)

    @property
    def out_dim(self) -> int:
        return self.num_features

    def encode_masked(self, img: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM: stage-1 tokens where ``mask`` (B, H, W) is 1 are replaced by ``mask_token`` (after the patch
        embedding and its norm, before any position embedding)."""
        x = self.embed(img)
        w = mask.unsqueeze(-1).to(x.dtype)
        return self.forward_tokens(x * (1 - w) + mask_token.to(x.dtype) * w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool the final map, then the classifier (or the pooled features with ``pre_logits``)."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def forward_intermediates(
        self,
        x,
        indices=None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's API behind ``features_only=True``: the selected stage maps as NCHW."""
        take, _ = feature_take_indices(len(self.stages), indices)
        last, outs = self.stage_outputs(x)
        inter = [outs[i].permute(0, 3, 1, 2).contiguous() for i in take]
        return inter if intermediates_only else (last, inter)

    def get_classifier(self) -> nn.Module:
        """timm's API: the classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        """timm's API: a new head for ``num_classes`` (an identity for 0)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
