"""Import-time compatibility fixes for the installed torch / torchvision pair.

Some machines carry a CPU-only torch next to the CUDA build of torchvision from PyPI (PyPI has no CPU build of
torchvision). Its compiled ops cannot load against a CPU torch, and torchvision >= 0.20 then fails at import because it
registers a fake kernel for ``torchvision::nms`` without checking that the op exists; timm imports torchvision, so
timm fails too. When, and only when, that exact failure happens, we declare the two missing operator schemas, give
``nms`` a pure-PyTorch CPU kernel (so torchvision's detection models still work), and import torchvision again.
Everything mimkit uses from torchvision (transforms, datasets, detection models) is pure Python.

``patch_timm_posterize``: timm's RandAugment (``inc1`` with magnitude noise) can posterize to 0 bits at magnitude 10;
Pillow >= 11 rejects 0 bits with a ValueError (older Pillow returned a black image). The patch gives timm's op the
old result for 0 bits and leaves every other case to Pillow.
"""

from __future__ import annotations

import sys

import torch

_LIB = None


def _nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on (N, 4) xyxy boxes; returns kept indices sorted by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    boxes = boxes[order].float()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    over = (iou > iou_threshold).cpu()
    for i in range(len(order)):  # greedy NMS is inherently sequential over ranked boxes
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i].to(suppressed.device)
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def ensure_torchvision() -> None:
    """Let timm import on a CPU-only torch paired with a PyPI torchvision (docs/design.md, dependency note)."""
    global _LIB
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.impl("nms", _nms_reference, "CPU")
    import torchvision  # noqa: F401,F811


def patch_timm_posterize() -> None:
    """Make timm's RandAugment posterize at 0 bits return a black image on Pillow >= 11 (docs/design.md)."""
    import timm.data.auto_augment as aa
    from PIL import Image

    original = aa.posterize
    if getattr(original, "_mimkit_safe", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:  # Pillow < 11 semantics: no bit kept is a black image
            return Image.new(img.mode, img.size, 0 if img.mode in ("L", "I", "F") else (0,) * len(img.getbands()))
        return original(img, bits_to_keep, **kwargs)

    setattr(posterize, "_mimkit_safe", True)  # noqa: B010  (a mark on a function)
    aa.posterize = posterize
    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is original:
            aa.NAME_TO_OP[name] = posterize
