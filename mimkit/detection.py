"""Use a pretrained pyramid encoder as a detection backbone with torchvision's detectors.

``fpn_backbone`` wraps a timm ``features_only`` model (strides 4-32) in torchvision's FeaturePyramidNetwork; the result
has the ``out_channels`` attribute torchvision's RetinaNet / Faster R-CNN / FCOS expect. ``anchor_generator`` gives
anchors matching its levels. (Faster R-CNN needs torchvision's compiled roi_align; RetinaNet and FCOS do not.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` encoder plus an FPN, shaped for torchvision's detection models."""

    def __init__(self, body: Any, out_channels: int = 256, skip_first: bool = True):
        """``body``: a timm ``features_only`` model (or ``ViTSimplePyramid``), with its ``feature_info``."""
        super().__init__()
        self.body = body
        channels = body.feature_info.channels()
        self.first = 1 if skip_first else 0  # stride-4 maps are usually too large for detection heads
        self.fpn = FeaturePyramidNetwork(channels[self.first :], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = body.feature_info.reduction()[self.first :] + [body.feature_info.reduction()[-1] * 2]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)[self.first :]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def fpn_backbone(name: str, weights: str | None = None, out_channels: int = 256, **kwargs) -> TimmFPNBackbone:
    """An FPN backbone from a registered mimkit/timm pyramid model, optionally with exported mimkit weights."""
    if weights:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights), custom_load=False)
    body = timm.create_model(name, features_only=True, **kwargs)
    return TimmFPNBackbone(body, out_channels)


class _FeatureInfo:
    def __init__(self, channels: list[int], reductions: list[int]):
        self._c, self._r = channels, reductions

    def channels(self) -> list[int]:
        return list(self._c)

    def reduction(self) -> list[int]:
        return list(self._r)


class ViTSimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid for a plain ViT: from the last stride-16 map, two transposed convs give
    stride 4, one gives stride 8, identity gives 16 and max-pooling 32 (Li et al. 2022, "Exploring plain vision
    transformer backbones"). Outputs NCHW maps like ``features_only``."""

    def __init__(self, vit: Any, channels: int = 256):
        """``vit``: a timm ``VisionTransformer`` of patch 16."""
        super().__init__()
        self.vit = vit
        dim: int = vit.embed_dim
        if vit.patch_embed.patch_size[0] != 16:
            raise ValueError("the simple pyramid expects a patch-16 ViT (stride 16)")
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            nn.GroupNorm(1, dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        )
        self.up8 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.feature_info = _FeatureInfo([dim // 4, dim // 2, dim, dim], [4, 8, 16, 32])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        h, w = x.shape[2] // 16, x.shape[3] // 16
        m = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return [self.up4(m), self.up8(m), m, nn.functional.max_pool2d(m, 2)]


def vit_pyramid_backbone(
    name: str, weights: str | None = None, out_channels: int = 256, img_size: int = 512, **kwargs
) -> TimmFPNBackbone:
    """An FPN backbone from an exported mimkit ViT (strides 8-32 + an extra level), via the simple pyramid."""
    if weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), custom_load=False))
    vit = timm.create_model(name, num_classes=0, img_size=img_size, dynamic_img_size=True, **kwargs)
    return TimmFPNBackbone(ViTSimplePyramid(vit), out_channels)


def anchor_generator(backbone: TimmFPNBackbone, base: float = 4.0):
    """torchvision anchors for the backbone's strides (``base`` x stride, ratios 0.5, 1, 2)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((int(s * base),) for s in backbone.strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
