"""Image sizes: an int (square) or (height, width)."""

from __future__ import annotations

from collections.abc import Sequence

ImageSize = int | Sequence[int]  # what the functions below take: 224 or (192, 256)


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` -> (224, 224); ``(192, 256)`` -> (192, 256)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def size_text(size: int | Sequence[int]) -> str:
    """``224`` -> ``224 px``; ``(192, 256)`` -> ``192x256 px`` (height x width)."""
    h, w = pair(size)
    return f"{h} px" if h == w else f"{h}x{w} px"


def canonical(size: int | Sequence[int]) -> int | tuple[int, int]:
    """An int for square sizes (as saved configs and timm's default cfgs have them), else (height, width)."""
    h, w = pair(size)
    return h if h == w else (h, w)


def require_square(size: int | Sequence[int], who: str) -> int:
    """The side of a square size; a ``ValueError`` naming who needs squares and what takes rectangles otherwise."""
    h, w = pair(size)
    if h != w:
        raise ValueError(
            f"{who} takes square images only, got --img-size {h} {w}; rectangular sizes work with MAE, SimMIM, "
            "LoMaR and UM-MAE (ViT, Swin, PVT)"
        )
    return h
