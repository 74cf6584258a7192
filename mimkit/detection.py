"""Use a pretrained pyramid encoder as a detection backbone with torchvision's detectors.

``fpn_backbone`` wraps a timm ``features_only`` model (strides 4-32) in torchvision's FeaturePyramidNetwork; the result
has the ``out_channels`` attribute torchvision's RetinaNet / Faster R-CNN / FCOS expect. ``anchor_generator`` gives
anchors matching its levels. (Faster R-CNN needs torchvision's compiled roi_align; RetinaNet and FCOS do not.)
"""
from __future__ import annotations

from collections import OrderedDict

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class TimmFPNBackbone(nn.Module):
    def __init__(self, body: nn.Module, out_channels: int = 256, skip_first: bool = True):
        super().__init__()
        self.body = body
        channels = body.feature_info.channels()
        self.first = 1 if skip_first else 0  # stride-4 maps are usually too large for detection heads
        self.fpn = FeaturePyramidNetwork(channels[self.first:], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = body.feature_info.reduction()[self.first:] + [body.feature_info.reduction()[-1] * 2]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)[self.first:]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def fpn_backbone(name: str, weights: str | None = None, out_channels: int = 256, **kwargs) -> TimmFPNBackbone:
    """An FPN backbone from a registered mimkit/timm pyramid model, optionally with exported mimkit weights."""
    if weights:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights), custom_load=False)
    body = timm.create_model(name, features_only=True, **kwargs)
    return TimmFPNBackbone(body, out_channels)


def anchor_generator(backbone: TimmFPNBackbone, base: float = 4.0):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((int(s * base),) for s in backbone.strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
