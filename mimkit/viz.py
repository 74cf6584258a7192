"""Reconstruction figures: original | what the encoder saw | reconstruction | reconstruction + visible patches."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mimkit.patches import patchify, unpatchify

HIDDEN_GRAY = 0.5
SECONDARY_TINT = (0.25, 0.35, 0.75)  # masked patches for which the encoder saw a learned mask token instead

LEGEND = {
    "secondary": "blue = masked (mask token shown)",
    "outside": "gray in recon. = outside the windows",
    "encoder_input": "masked area filled with the partner image",
}


def display_bands(images: torch.Tensor, bands=None) -> torch.Tensor:
    """(N, C, H, W) -> (N, 3, H, W) for display: RGB as it is, 1 channel as grey, more than 3 channels as the
    ``bands`` triplet (default 0, 1, 2) in red, green, blue; 2 channels show the first as grey. Figures of
    other than 3 channels are contrast-stretched per image and band (1st-99th percentile of the original)."""
    c = images.shape[1]
    if bands is None:
        bands = (0, 1, 2) if c >= 3 else (0, 0, 0)
    if max(bands) >= c:
        raise ValueError(f"bands {list(bands)}: the images have {c} channel(s) (bands count from 0)")
    return images[:, list(bands)]


def _to_pil(img01: torch.Tensor, scale: int) -> Image.Image:
    arr = (img01.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) if scale > 1 else im


def denormalize_predictions(
    pred: torch.Tensor, target_patches: torch.Tensor, visible: torch.Tensor, stats: str = "target", eps: float = 1e-6
) -> torch.Tensor:
    """Map normalized-pixel predictions (N, L, D) back to image space.

    ``stats="target"``: each patch uses the mean/var of its own ground-truth patch (what MAE's and UM-MAE's
    notebooks do; it leaks the true patch statistics into masked areas). ``stats="visible"``: every patch uses
    the average mean/var of the visible patches of the same image, so nothing of the masked area is used.
    """
    if stats == "target":
        mean = target_patches.mean(-1, keepdim=True)
        var = target_patches.var(-1, keepdim=True)
    elif stats == "visible":
        w = visible.unsqueeze(-1).float()
        count = w.sum(1, keepdim=True).clamp(min=1)
        mean = (target_patches.mean(-1, keepdim=True) * w).sum(1, keepdim=True) / count
        var = (target_patches.var(-1, keepdim=True) * w).sum(1, keepdim=True) / count
        mean, var = mean.expand_as(pred[..., :1]), var.expand_as(pred[..., :1])
    else:
        raise ValueError(f"stats must be 'target' or 'visible', got {stats!r}")
    return pred * (var + eps) ** 0.5 + mean


def reconstruction_panels(
    model, images: torch.Tensor, mean, std, stats: str = "target", seed: int = 0, bands=None
) -> tuple[torch.Tensor, ...]:
    """Four (N, 3, H, W) tensors in [0, 1]: original, encoder input, reconstruction, reconstruction + visible
    (channels other than RGB shown as ``display_bands`` says)."""
    return _reconstruct(model, images, mean, std, stats, seed, bands)[0]


@torch.no_grad()
def _reconstruct(model, images, mean, std, stats, seed, bands=None):
    model.eval()
    torch.manual_seed(seed)
    _, out = model({"image": images})
    p = model.patch_size
    grid = (images.shape[2] // p, images.shape[3] // p)
    target = patchify(images, p)
    hidden = out["hidden"].float()
    pred = out["pred"].float()
    if model.norm_pix_loss:
        pred = denormalize_predictions(pred, target, 1 - hidden, stats)
    c = images.shape[1]
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)

    def to01(x):
        return x * s + m

    def to_px(m):
        return unpatchify(m.float().unsqueeze(-1).expand(-1, -1, p * p * c), p, grid, c)

    hidden_px = to_px(hidden)
    original = to01(images)
    seen = original * (1 - hidden_px) + HIDDEN_GRAY * hidden_px
    if "encoder_input" in out:  # e.g. MixMAE: the encoder saw another image in the masked area
        seen = to01(out["encoder_input"].float())
    seen = display_bands(seen, bands)
    if "secondary" in out and "encoder_input" not in out:
        sec_px = display_bands(to_px(out["secondary"]), bands)
        tint = torch.tensor(SECONDARY_TINT, device=images.device).view(1, 3, 1, 1)
        seen = seen * (1 - sec_px) + tint * sec_px
    recon = to01(unpatchify(pred, p, grid, c))
    pasted = original * (1 - hidden_px) + recon * hidden_px
    if "outside" in out:  # e.g. LoMaR: patches outside every window are neither seen nor predicted
        out_px = to_px(out["outside"])
        recon = recon * (1 - out_px) + HIDDEN_GRAY * out_px
        pasted = pasted * (1 - out_px) + HIDDEN_GRAY * out_px
    panels = (display_bands(original, bands), seen, display_bands(recon, bands), display_bands(pasted, bands))
    if c != 3:  # scientific images rarely fill [0, 1]: stretch each shown band by the original's 1-99th percentile
        flat = panels[0].flatten(2)
        lo, hi = flat.quantile(0.01, dim=-1)[..., None, None], flat.quantile(0.99, dim=-1)[..., None, None]
        scale = (hi - lo).clamp(min=1e-6)
        gray_at = hidden_px[:, :1].expand_as(panels[1]) > 0 if "encoder_input" not in out else None
        stretched = [(x - lo) / scale for x in panels]
        if gray_at is not None:  # keep the dropped area gray (and tinted) in the encoder-input panel
            stretched[1] = torch.where(gray_at, panels[1], stretched[1])
        panels = tuple(stretched)
    return panels, [k for k in LEGEND if k in out]


def save_reconstruction_figure(
    model,
    images: torch.Tensor,
    mean,
    std,
    path: str | Path,
    stats: str = "target",
    title: str = "",
    seed: int = 0,
    bands=None,
) -> Path:
    """The four panels of ``reconstruction_panels`` for every image as one PNG with a legend; returns its path."""
    panels, keys = _reconstruct(model, images, mean, std, stats, seed, bands)
    n, _, h, w = images.shape
    scale = max(1, 160 // max(h, w))
    cell_w, cell_h = w * scale, h * scale
    pad, header = 4, 18
    norm_note = (
        (
            "predictions de-normalized with "
            + (
                "each patch's ground-truth mean/var (leaks patch statistics)"
                if stats == "target"
                else "the visible patches' mean/var only (no ground truth from masked area)"
            )
        )
        if model.norm_pix_loss
        else "raw-pixel targets: no de-normalization needed"
    )
    footer = 30
    canvas = Image.new("RGB", (4 * (cell_w + pad) + pad, header + n * (cell_h + pad) + pad + footer), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["original", "encoder input", "reconstruction", "recon. + visible"]):
        draw.text((pad + c * (cell_w + pad), 3), name, fill="black")
    for r in range(n):
        for c, panel in enumerate(panels):
            canvas.paste(_to_pil(panel[r], scale), (pad + c * (cell_w + pad), header + r * (cell_h + pad)))
    y = header + n * (cell_h + pad)
    legend = ", ".join(([] if "encoder_input" in keys else ["gray = dropped"]) + [LEGEND[k] for k in keys])
    draw.text((pad, y + 2), (title + " | " if title else "") + legend, fill="black")
    draw.text((pad, y + 15), norm_note, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def masking_frequencies(
    grid: tuple[int, int] = (7, 7), ratio: float = 0.6, iterations: int = 1600, seed: int = 0
) -> dict[str, torch.Tensor]:
    """How often each unit of one image is masked over ``iterations`` visits (CoMA Fig. 2): MAE's random masking,
    CoMA ``cycle`` and the trained view of CoMA ``pair``. Returns {name: (rows, cols) frequencies}."""
    from mimkit.masking import complementary_pair, cycle_mask, random_masking

    units = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.zeros(1, dtype=torch.long)
    out = {
        "random (MAE)": torch.zeros(units),
        "complementary, cycle": torch.zeros(units),
        "complementary, pair (view A)": torch.zeros(units),
    }
    for k in range(iterations):  # one mask per visit, as training draws them
        out["random (MAE)"] += random_masking(1, units, ratio, generator=g).mask[0]
        out["complementary, cycle"] += cycle_mask(idx, k, units, ratio, seed)[0]
        out["complementary, pair (view A)"] += complementary_pair(1, units, ratio, generator=g)[0][0]
    return {name: (v / iterations).view(*grid) for name, v in out.items()}


def save_masking_frequency_figure(
    path: str | Path, grid=(7, 7), ratio: float = 0.6, iterations: int = 1600, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Heat maps of ``masking_frequencies`` side by side, with each map's mean, standard deviation and range; the
    colour scale spans the mean +- 0.06 (white to dark red) so that a binomial spread is visible. Returns the
    statistics."""
    freqs = masking_frequencies(tuple(grid), ratio, iterations, seed)
    lo = float(next(iter(freqs.values())).mean()) - 0.06
    cell, pad, header, footer = 28, 12, 34, 46
    w = len(freqs) * (grid[1] * cell + pad) + pad
    canvas = Image.new("RGB", (w, header + grid[0] * cell + footer), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (pad, 4),
        f"masking frequency per unit over {iterations} visits, ratio {ratio}; colour: {lo:.2f} "
        f"(white) to {lo + 0.12:.2f} (dark red)",
        fill="black",
    )
    stats = {}
    for i, (name, f) in enumerate(freqs.items()):
        x0 = pad + i * (grid[1] * cell + pad)
        draw.text((x0, 20), name, fill="black")
        for r in range(grid[0]):
            for c in range(grid[1]):
                v = min(1.0, max(0.0, (float(f[r, c]) - lo) / 0.12))
                color = (255 - int(100 * v), int(255 * (1 - v)), int(255 * (1 - v)))
                draw.rectangle(
                    [x0 + c * cell, header + r * cell, x0 + (c + 1) * cell - 1, header + (r + 1) * cell - 1], fill=color
                )
        stats[name] = {"mean": float(f.mean()), "std": float(f.std()), "min": float(f.min()), "max": float(f.max())}
        s = stats[name]
        draw.text((x0, header + grid[0] * cell + 4), f"mean {s['mean']:.3f} std {s['std']:.4f}", fill="black")
        draw.text((x0, header + grid[0] * cell + 18), f"range {s['min']:.3f}-{s['max']:.3f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return stats
