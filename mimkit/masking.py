"""Mask generators. Each is a pure function of (shape, ratio, generator): same generator state, same mask.

Convention everywhere: ``mask`` is 1 where a patch is removed / to be predicted and 0 where it is visible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class MaskDraw(NamedTuple):
    """One random masking draw: visible indices, the inverse permutation and the raster-order mask."""

    ids_keep: torch.Tensor  # (N, len_keep) indices of visible patches (in shuffled order)
    ids_restore: torch.Tensor  # (N, L) inverse permutation: unshuffles [visible, masked] back to raster order
    mask: torch.Tensor  # (N, L) float, 1 = masked, raster order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's count: int(L * (1 - ratio)), at least one patch kept."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> MaskDraw:
    """Keep the ``len_keep`` lowest-noise patches of every row of ``noise`` (N, L)."""
    n, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskDraw(ids_keep, ids_restore, mask)


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> MaskDraw:
    """MAE per-sample random masking: argsort of i.i.d. uniform noise, keep int(L * (1 - ratio))."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return masking_from_noise(noise, num_visible(num_patches, mask_ratio))


def upsample_cells(x: torch.Tensor, kh: int, kw: int | None = None) -> torch.Tensor:
    """Nearest upsampling of a cell map over its last two dims: (..., H, W) -> (..., H*kh, W*kw)."""
    return x.repeat_interleave(kh, -2).repeat_interleave(kh if kw is None else kw, -1)


def flat_rows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``ids`` (N, K) in sequences of ``length`` -> row numbers (N*K,) of the (N*length, D) matrix."""
    offsets = torch.arange(0, ids.shape[0] * length, length, device=ids.device, dtype=ids.dtype)
    return (ids + offsets.unsqueeze(1)).reshape(-1)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D): ``torch.gather`` along the tokens, taken as whole rows.

    ``index_select`` over the (N*L, D) rows copies each row at once (and its backward adds rows back), where
    ``gather`` with an index expanded over D goes element by element: on CPU-3 2.2x faster forward and backward
    for 192 of a decoder's (8, 256, 512) rows (docs/benchmarks.md, "Row gathers")."""
    n, length, d = x.shape
    if n > 1 and x.stride(0) == 0:  # one sequence expanded over the batch (positions): select from it, no copy
        return x[0].index_select(0, ids.reshape(-1)).view(n, ids.shape[1], d)
    if not x.is_contiguous():  # rows are not rows of one matrix (a slice, a permuted view): no copy of all of x
        return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, d))
    return x.view(n * length, d).index_select(0, flat_rows(ids, length)).view(n, ids.shape[1], d)


# -- UM-MAE: uniform sampling, secondary masking, compaction (docs/methods.md 4.2-4.4) --------------------------------


def uniform_sampling(
    batch_size: int, grid: tuple[int, int], device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """UM-MAE uniform sampling: exactly one kept patch in every 2x2 block of the patch grid, chosen uniformly and
    independently per block and per sample. Returns the mask (N, rows*cols), 1 = dropped, raster order."""
    rows, cols = grid
    if rows % 2 or cols % 2:
        raise ValueError(
            f"uniform masking needs an even patch grid, got {rows}x{cols} patches; use an image size "
            "that is a multiple of 2 x the patch size (e.g. 32 px steps for 16 px patches)"
        )
    choice = torch.randint(0, 4, (batch_size, rows // 2, cols // 2), device=device, generator=generator)
    # a comparison instead of one_hot, which reads the values' range back to the host (a GPU sync every step)
    keep = (choice.unsqueeze(-1) == torch.arange(4, device=choice.device)).long()
    keep = keep.view(batch_size, rows // 2, cols // 2, 2, 2)
    keep = keep.permute(0, 1, 3, 2, 4).reshape(batch_size, rows * cols)
    return 1.0 - keep.float()


def kept_block_order(us_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster indices (N, L/4) of the kept patch of each 2x2 block, blocks in raster order ("block order": the order
    of the compact 2-D input)."""
    rows, cols = grid
    n = us_mask.shape[0]
    keep = (1 - us_mask).view(n, rows // 2, 2, cols // 2, 2).permute(0, 1, 3, 2, 4).reshape(n, -1, 4)
    within = keep.argmax(-1)  # 0..3 = (dy, dx) inside the block
    br = torch.arange(rows // 2, device=us_mask.device).view(1, -1, 1)
    bc = torch.arange(cols // 2, device=us_mask.device).view(1, 1, -1)
    r = 2 * br + within.view(n, rows // 2, cols // 2) // 2
    c = 2 * bc + within.view(n, rows // 2, cols // 2) % 2
    return (r * cols + c).reshape(n, -1)


def secondary_masking(
    num_kept: int, batch_size: int, ratio: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """UM-MAE secondary masking over the kept patches: (N, num_kept), 1 = replaced by the learnable token.
    Exactly ``num_kept - int(num_kept * (1 - ratio))`` per sample."""
    n_visible = int(num_kept * (1 - ratio))
    noise = torch.rand(batch_size, num_kept, device=device, generator=generator)
    return masking_from_noise(noise, n_visible).mask


def block_mask(
    batch_size: int,
    grid: tuple[int, int],
    unit: int,
    ratio: float,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SimMIM masking: a random ``ceil(ratio * cells)`` of the (rows/unit x cols/unit) cells, each cell ``unit`` x
    ``unit`` patches. Returns (N, rows*cols) at patch resolution, 1 = masked."""
    rows, cols = grid
    if rows % unit or cols % unit:
        raise ValueError(f"the {rows}x{cols} token grid is not divisible by the mask unit of {unit} tokens")
    gr, gc = rows // unit, cols // unit
    n_mask = int(math.ceil(gr * gc * ratio))
    noise = torch.rand(batch_size, gr * gc, device=device, generator=generator)
    cells = masking_from_noise(noise, gr * gc - n_mask).mask
    cells = cells.view(batch_size, gr, 1, gc, 1).expand(-1, -1, unit, -1, unit)
    return cells.reshape(batch_size, rows * cols)


def compact(x: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Gather whole patches into a compact 2-D map (UM-MAE's re-organization as an index gather).

    x: (N, H, W, C) token map covering a (rows x cols) patch grid (each patch H/rows x W/cols tokens).
    ids: (N, M) raster patch indices in block order (``kept_block_order``). Returns (N, H/2, W/2, C) where compact
    patch (i, j) is the kept patch of 2x2 block (i, j).
    """
    n, h, w, c = x.shape
    rows, cols = grid
    kh, kw = h // rows, w // cols
    patches = x.view(n, rows, kh, cols, kw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, rows * cols, kh * kw * c)
    kept = gather_tokens(patches, ids).view(n, rows // 2, cols // 2, kh, kw, c)
    return kept.permute(0, 1, 3, 2, 4, 5).reshape(n, rows // 2 * kh, cols // 2 * kw, c)


def grid_sampling(batch_size: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """MAE's grid-wise sampling: the top-left patch of every 2x2 block is kept (same for every sample)."""
    rows, cols = grid
    keep = torch.zeros(rows, cols, device=device)
    keep[::2, ::2] = 1
    return (1 - keep).reshape(1, -1).expand(batch_size, -1).clone()


def random_sampling(
    batch_size: int, grid: tuple[int, int], device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAE's random sampling with exactly a quarter of the patches kept (UM-MAE Table 1's RS at equal input)."""
    length = grid[0] * grid[1]
    return masking_from_noise(torch.rand(batch_size, length, device=device, generator=generator), length // 4).mask


# -- LoMaR: local windows (docs/methods.md 5.2) ------------------------------------------------------------------------


def window_offsets(
    batch_size: int,
    grid: tuple[int, int],
    window: int,
    num_windows: int,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left patch offsets (rows, cols), each (N, num_windows), of square windows inside the grid.

    As in LoMaR's sampler, the row offsets are the first ``num_windows`` of a random permutation of the valid rows and
    the column offsets likewise, paired in order: distinct rows and distinct columns. When there are fewer valid
    offsets than windows, the permutation is reused cyclically (windows then repeat rows or columns)."""
    out = []
    for size in grid:
        positions = size - window + 1
        if positions < 1:
            raise ValueError(f"a {window}-patch window does not fit a grid of {grid[0]}x{grid[1]} patches")
        perm = torch.rand(batch_size, positions, device=device, generator=generator).argsort(dim=1)
        take = torch.arange(num_windows, device=device) % positions
        out.append(perm[:, take])
    return out[0], out[1]


def window_patch_ids(rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Raster patch indices (N, num_windows, window**2) of windows with top-left (rows, cols), window raster order."""
    d = torch.arange(window, device=rows.device)
    r = rows.unsqueeze(-1).unsqueeze(-1) + d.view(1, 1, -1, 1)
    c = cols.unsqueeze(-1).unsqueeze(-1) + d.view(1, 1, 1, -1)
    return (r * grid[1] + c).flatten(2)


# -- CoMA: complementary masks (docs/coma.md section 3) -----------------------------------------------------------


def num_masked(num_units: int, ratio: float) -> int:
    """Units masked at ``ratio``: L - int(L * (1 - ratio)), MAE's count."""
    return num_units - num_visible(num_units, ratio)


def complementary_pair(
    batch_size: int, num_units: int, ratio: float, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair`` mode: per sample a random set of ``num_masked`` units; view A masks it, view B masks the rest.
    Returns (mask_a, mask_b), each (N, L), 1 = masked; mask_a + mask_b = 1 everywhere."""
    noise = torch.rand(batch_size, num_units, device=device, generator=generator)
    mask_a = masking_from_noise(noise, num_units - num_masked(num_units, ratio)).mask
    return mask_a, 1 - mask_a


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors (no overflow: every product stays below 2**63)."""
    mask = 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return x ^ (x >> 16)


def sample_permutations(indices: torch.Tensor, num_units: int, seed: int) -> torch.Tensor:
    """A fixed pseudo-random permutation of the units for every sample index (N,) -> (N, L): a pure function of
    (seed, index), identical on every call, process and device."""
    idx = indices.long().view(-1, 1) & 0x7FFFFFFF  # below 2**31, so idx * 2654435761 stays below 2**63
    units = torch.arange(num_units, device=indices.device).view(1, -1)
    key = _hash32(_hash32(idx * 2654435761 % 2**32 ^ (seed & 0xFFFFFFFF)) ^ units)
    return torch.argsort(key * num_units + units, dim=1)


def cycle_mask(
    indices: torch.Tensor, visits: torch.Tensor | int, num_units: int, ratio: float, seed: int = 0
) -> torch.Tensor:
    """``cycle`` mode: visit k of sample i masks positions [k*m, k*m + m) (cyclically) of sample i's fixed unit
    permutation, m = num_masked. Consecutive visits mask what was visible before, and over N/gcd(N, m) visits every
    unit is masked exactly m/gcd(N, m) times: frequency m/N. Returns (N, L), 1 = masked."""
    m = num_masked(num_units, ratio)
    perm = sample_permutations(indices, num_units, seed)
    visits = torch.as_tensor(visits, device=indices.device).long().expand(indices.shape[0])
    pos = (visits.view(-1, 1) * m + torch.arange(m, device=indices.device).view(1, -1)) % num_units
    chosen = perm.gather(1, pos)
    return torch.zeros(indices.shape[0], num_units, device=indices.device).scatter(1, chosen, 1.0)


def keep_positions(mask: torch.Tensor, len_keep: int) -> torch.Tensor:
    """A mask (N, L) with ``len_keep`` zeros per row -> the positions of its zeros (N, len_keep), in raster order."""
    return torch.argsort(mask, dim=1, stable=True)[:, :len_keep]
