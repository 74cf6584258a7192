"""Robust image decoding: every readable image becomes 8-bit RGB; unreadable ones raise ``BadImage``."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image

# Transparent pixels are composited onto this colour: the ImageNet mean, which is ~0 after normalization.
ALPHA_BACKGROUND = (124, 116, 104)


class BadImage(Exception):
    """An image that cannot be used; ``str()`` says why."""


def _high_bit_depth_to_8bit(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype == np.uint16 or im.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 65535.0
    else:  # 'I' (int32) or 'F' (float32): scale by the observed range
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (grayscale, palette, RGBA, CMYK, 16-bit, float, ...) to 8-bit RGB."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_bit_depth_to_8bit(im).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str, min_size: int = 1) -> Image.Image:
    """Open, fully decode and convert ``path`` to RGB; raise ``BadImage`` with the reason when that is impossible."""
    try:
        with Image.open(path) as im:
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            rgb = to_rgb(im)
            rgb.load()
    except FileNotFoundError as err:
        raise BadImage(f"file not found ({err.strerror})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"cannot decode: {err}") from None
    if min(rgb.size) < min_size:
        raise BadImage(
            f"too small: {rgb.size[0]}x{rgb.size[1]} px, the minimum side is {min_size} px "
            "(set data.min_image_size to change it)"
        )
    return rgb
