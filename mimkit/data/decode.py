"""Robust image decoding: every readable image becomes 8-bit RGB; unreadable ones raise ``BadImage``."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

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


def _too_small(width: int, height: int, min_size: int) -> BadImage:
    return BadImage(f"too small: {width}x{height} px, the minimum side is {min_size} px (--min-image-size changes it)")


def _too_large(err: Exception) -> BadImage:
    return BadImage(
        f"too large: {err} Cut it into tiles (or raise PIL.Image.MAX_IMAGE_PIXELS when calling mimkit from Python)."
    )


def load_rgb(path: str, min_size: int = 1) -> Image.Image:
    """Open, fully decode and convert ``path`` to RGB; raise ``BadImage`` with the reason when that is impossible,
    or when it is a TIFF of bands that RGB would drop (``_pil_tiff_bands``, ``_check_tiff_bands``)."""
    start = path.tell() if hasattr(path, "tell") else None  # a shard member: an open file
    try:
        with _tiff_notes(), Image.open(path) as im:
            if im.format == "TIFF":
                _pil_tiff_bands(im, path, start)
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            rgb = to_rgb(im)
            rgb.load()
    except FileNotFoundError as err:
        raise BadImage(f"file not found ({err.strerror})") from None
    except Image.DecompressionBombError as err:
        raise _too_large(err) from None
    except (OSError, SyntaxError, ValueError) as err:
        if start is not None:
            path.seek(start)  # type: ignore[attr-defined]
        if _is_tiff(path):  # Pillow cannot open a TIFF of more than 4 samples: name the --in-chans that reads it
            _check_tiff_bands(path)
        raise BadImage(f"cannot decode: {err}") from None
    if min(rgb.size) < min_size:
        raise _too_small(rgb.size[0], rgb.size[1], min_size)
    return rgb


def _pil_tiff_bands(im: Image.Image, path, start: int | None) -> None:
    """For a TIFF that Pillow opened: its samples per pixel from the tags it read (no second parse of the file),
    and for a file of several pages the band count of its first series (``_check_tiff_bands``): a page per band
    would otherwise be read as its first page, a grey image."""
    if getattr(im, "n_frames", 1) > 1:
        if start is not None:
            path.seek(start)  # Pillow has read on; _check_tiff_bands reads from here and puts it back
        _check_tiff_bands(path)
        return
    tags = getattr(im, "tag_v2", {})
    samples = int(tags.get(277, 1))  # SamplesPerPixel
    extra = tags.get(338, ())  # ExtraSamples: 1 associated, 2 unassociated alpha, 0 unspecified
    alpha = any(int(e) in (1, 2) for e in (extra if isinstance(extra, (tuple, list)) else (extra,)))
    if samples not in (1, 3) and not (alpha and samples in (2, 4)):
        raise _band_stack(samples)


def _band_stack(chans: int) -> BadImage:
    return BadImage(
        f"has {chans} channel(s) (a multi-band TIFF), the model takes --in-chans 3: give --in-chans {chans} to read "
        "every band at full bit depth"
    )


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# Integer images are divided by this to lie in [0, 1]; PIL reads 16-bit PNGs as 32-bit integers ('I').
INTEGER_SCALE = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "int32": 65535.0, "uint32": 65535.0}


def _is_tiff(src) -> bool:
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        if str(src).lower().endswith((".tif", ".tiff")):
            return True
        try:
            with open(src, "rb") as f:
                return f.read(4) in TIFF_MAGIC
        except OSError:
            return False
    pos = src.tell()
    head = src.read(4)
    src.seek(pos)
    return head in TIFF_MAGIC


def _check_tiff_bands(src) -> None:
    """Raise ``BadImage`` for a TIFF whose first series holds other than 1 or 3 channels (an alpha channel aside),
    counted as ``load_array`` counts them. Pillow reads such a file's first page as a grey image, or not at all (a
    band stack of Sentinel-2, a microscopy stack): the reason names the --in-chans that reads every band. Only the
    header is read; a file tifffile cannot parse is left to Pillow to report."""
    import tifffile

    pos = src.tell() if hasattr(src, "tell") else None
    try:
        with _tiff_notes(), tifffile.TiffFile(src) as tif:
            series = tif.series[0]
            shape = tuple(series.shape)
            alpha = any(int(e) in (1, 2) for e in series.keyframe.extrasamples)  # associated / unassociated
    except Exception:  # damaged, or not a TIFF after all
        return
    finally:
        if pos is not None:
            src.seek(pos)
    shape = tuple(n for n in shape if n != 1) if len(shape) > 3 else shape  # singleton axes of a 2-D image
    if len(shape) < 3:
        return
    if len(shape) > 3:  # frames of colour images are read as the first one (as a GIF's); other stacks are not
        if shape[-1] == 3 or (alpha and shape[-1] == 4):
            return
        raise BadImage(f"a TIFF of shape {shape}: not one 2-D image of bands; save one image per file")
    chans = shape[-1] if _channels_last(shape, 3) else shape[0]
    if chans == 3 or (alpha and chans in (2, 4)):
        return
    raise _band_stack(chans)


def _read_array(src) -> np.ndarray:
    """Decode a path (opened once: its first bytes and its name tell TIFF apart) or an open binary file."""
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        with open(src, "rb") as f:
            return _decode_array(f, str(src).lower().endswith((".tif", ".tiff")))
    return _decode_array(src, False)


def _decode_array(f, tiff_name: bool) -> np.ndarray:
    pos = f.tell()
    head = f.read(4)
    f.seek(pos)
    if tiff_name or head in TIFF_MAGIC:
        import tifffile

        with _tiff_notes() as notes:  # its warnings on a damaged file go into our one skip line, not the log
            arr = np.asarray(tifffile.imread(f))  # the first series: all bands of a planar or page-per-band file
        if arr.size == 0 and notes:
            raise BadImage(f"cannot decode: the file holds no image data (tifffile: {notes[0][:200]})")
        return arr
    with Image.open(f) as im:
        im.load()
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
            return np.asarray(im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB"))
        return np.asarray(im)


_TIFF_NOTES = threading.local()


class _CollectTiffLogs(logging.Filter):
    """On tifffile's and Pillow's TIFF logger: while this thread reads a file through ``_tiff_notes``, their records
    are kept (tifffile's for the reason of a skip) instead of printed once per read (every epoch); every other use of
    either logs as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_TIFF_NOTES, "notes", None)
        if notes is None:
            return True
        notes.append(record.getMessage())
        return False


for _name in ("tifffile", "PIL.TiffImagePlugin"):  # once; a filter that passes records on outside _tiff_notes
    logging.getLogger(_name).addFilter(_CollectTiffLogs())


@contextmanager
def _tiff_notes():
    """Collect the two TIFF loggers' records of this thread while inside (nesting keeps the outer list)."""
    outer = getattr(_TIFF_NOTES, "notes", None)
    _TIFF_NOTES.notes = notes = []
    try:
        yield notes
    finally:
        _TIFF_NOTES.notes = outer


def to_chw(arr: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (C, H, W). With three dimensions the channel axis is the one of length
    ``in_chans`` (the last when both are), else the shorter of the first and last."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise BadImage(f"unsupported array shape {tuple(arr.shape)} (need H x W, H x W x C or C x H x W)")
    return np.moveaxis(arr, -1, 0) if _channels_last(arr.shape, in_chans) else arr


def _channels_last(shape: tuple, in_chans: int) -> bool:
    """Whether the channels of a 3-D image of ``shape`` are on its last axis (``to_chw``'s rule)."""
    return shape[-1] == in_chans or (shape[0] != in_chans and shape[-1] <= shape[0])


def load_array(src, min_size: int = 1, in_chans: int | None = 1):
    """Any image at full precision as a float32 tensor (C, H, W), C == ``in_chans``: 8/16/32-bit, grey, RGB(A), or
    multi-band TIFF (tifffile). Integers are divided by their type's full scale (``INTEGER_SCALE``: 8-bit by 255,
    16-bit by 65535), floats are kept as they are. Raises ``BadImage`` when unreadable, too small, or of another
    channel count (docs/data.md, "Channels and bit depth"); ``in_chans=None`` takes any count."""
    import torch

    try:
        arr = _read_array(src)
    except FileNotFoundError as err:
        raise BadImage(f"file not found ({err.strerror})") from None
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise _too_large(err) from None
    except Exception as err:  # PIL and tifffile raise many types for damaged files
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None
    if arr.size == 0:
        raise BadImage("cannot decode: the file holds no image data")
    chw = to_chw(arr, in_chans or 0)
    if in_chans is not None and chw.shape[0] != in_chans:
        raise BadImage(f"has {chw.shape[0]} channel(s), the model takes --in-chans {in_chans}")
    if min(chw.shape[1:]) < min_size:
        raise _too_small(chw.shape[2], chw.shape[1], min_size)
    if chw.dtype == np.bool_:
        out = chw.astype(np.float32)
    elif chw.dtype.kind in "iu":
        scale = INTEGER_SCALE.get(chw.dtype.name, float(np.iinfo(chw.dtype).max))
        out = chw.astype(np.float32) / scale
    else:
        out = chw.astype(np.float32)
    if not np.isfinite(out).all():
        raise BadImage("holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(out))


def load_image(src, min_size: int = 1, in_chans: int = 3):
    """What a model with ``in_chans`` channels reads: 8-bit RGB (PIL) for 3, a float tensor (C, H, W) otherwise."""
    return load_rgb(src, min_size) if in_chans == 3 else load_array(src, min_size, in_chans)
