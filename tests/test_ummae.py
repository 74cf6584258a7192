import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mimkit.masking import compact, kept_block_order, secondary_masking, uniform_sampling
from mimkit.methods import create_method
from mimkit.models.swin import SwinBlock, WindowLayout, grid_coords

grids = st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda t: (2 * t[0], 2 * t[1]))


@settings(max_examples=50, deadline=None)
@given(grids, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_uniform_sampling_keeps_exactly_one_per_2x2_block(grid, n, seed):
    us = uniform_sampling(n, grid, generator=torch.Generator().manual_seed(seed))
    rows, cols = grid
    kept_per_block = (1 - us).view(n, rows // 2, 2, cols // 2, 2).sum(dim=(2, 4))
    assert torch.all(kept_per_block == 1)
    ids = kept_block_order(us, grid)
    assert ids.shape == (n, rows * cols // 4)
    for i in range(n):  # id j is the kept patch of block j (blocks in raster order)
        for j, pid in enumerate(ids[i].tolist()):
            assert us[i, pid] == 0
            assert (pid // cols) // 2 == j // (cols // 2) and (pid % cols) // 2 == j % (cols // 2)


def test_uniform_sampling_is_uniform_over_the_four_positions():
    us = uniform_sampling(4000, (2, 2), generator=torch.Generator().manual_seed(0))
    freq = (1 - us).mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 4), st.sampled_from([0.0, 0.15, 0.25, 0.35]))
def test_secondary_masking_leaves_int_075_visible(kept, n, ratio):
    sm = secondary_masking(kept, n, ratio)
    assert torch.all((1 - sm).sum(1) == int(kept * (1 - ratio)))
    if kept == 64 and ratio == 0.25:
        assert torch.all((1 - sm).sum(1) == 48)


def _reference_dilated_ones_conv(x, us, grid, k):
    """UM-MAE's reference compaction: zero the dropped patches, then a depthwise 2x2 all-ones conv with dilation k
    over every (2k x 2k) block sums its four quadrants (only the kept one is non-zero)."""
    n, h, w, c = x.shape
    rows, cols = grid
    keep_px = (1 - us).view(n, rows, cols).repeat_interleave(k, 1).repeat_interleave(k, 2).unsqueeze(-1)
    y = (x * keep_px).permute(0, 3, 1, 2)
    blocks = y.view(n, c, rows // 2, 2 * k, cols // 2, 2 * k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, 2 * k, 2 * k)
    out = F.conv2d(blocks, torch.ones(c, 1, 2, 2), dilation=k, groups=c)  # (n*R*C, c, k, k)
    out = out.view(n, rows // 2, cols // 2, c, k, k).permute(0, 1, 4, 2, 5, 3)
    return out.reshape(n, rows // 2 * k, cols // 2 * k, c)


@pytest.mark.parametrize("k", [1, 4])
def test_gather_compaction_equals_dilated_ones_conv(k):
    grid = (8, 6)
    x = torch.randn(3, grid[0] * k, grid[1] * k, 5)
    us = uniform_sampling(3, grid, generator=torch.Generator().manual_seed(1))
    ours = compact(x, kept_block_order(us, grid), grid)
    assert torch.allclose(ours, _reference_dilated_ones_conv(x, us, grid, k), atol=1e-6)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("grid", [(8, 8), (8, 16)])
def test_compact_window_attention_equals_masked_full_resolution(shifted, grid):
    """Stage-1 Swin block on the compact map (window 8, shift 4) == full-resolution window 16 / shift 8 block with
    the dropped tokens' keys masked out, at the kept tokens (docs/methods.md 4.5, paper Fig. 3); square and
    rectangular grids."""
    torch.manual_seed(0)
    n, c, k = 2, 16, 4  # patches of 16 px, 4x4 tokens each: a 32x32 (or 32x64) token map
    block = SwinBlock(c, num_heads=2, mlp_ratio=2.0, shifted=shifted).eval()
    for p in block.attn.pos_mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)  # a clearly non-trivial position bias
    x = torch.randn(n, grid[0] * k, grid[1] * k, c)
    us = uniform_sampling(n, grid, generator=torch.Generator().manual_seed(3))
    ids = kept_block_order(us, grid)
    full_coords = grid_coords(grid[0] * k, grid[1] * k)
    keep_px = (1 - us).view(n, *grid).repeat_interleave(k, 1).repeat_interleave(k, 2)
    key_mask = torch.zeros_like(keep_px).masked_fill(keep_px == 0, float("-inf"))
    h, w = grid[0] * k, grid[1] * k
    with torch.no_grad():
        full = block(x, WindowLayout(h, w, 16, 8 if shifted else 0), key_mask)
        # the same grid given as explicit coordinates (the per-image index path) gives the same block output
        explicit = block(x, WindowLayout(h, w, 16, 8 if shifted else 0, full_coords), key_mask)
        coords = compact(full_coords.expand(n, -1, -1, -1), ids, grid)
        small = block(compact(x, ids, grid), WindowLayout(h // 2, w // 2, 8, 4 if shifted else 0, coords, span=2))
    assert torch.allclose(explicit, full, atol=1e-5)
    assert torch.allclose(compact(full, ids, grid), small, atol=1e-5)


def test_decoder_positions_follow_the_compaction_order():
    model = create_method("umae_swin_pico_128")
    us, ids, _ = model.draw_masks(4, "cpu")
    kept = us == 0

    def placed() -> torch.Tensor:
        # the id of the patch each grid position's encoder token came from, -1 at the dropped positions
        out = torch.full(us.shape, -1.0)
        return out.scatter(1, model.decoder_positions(ids), ids.float())

    assert torch.equal(placed()[kept], torch.nonzero(kept)[:, 1].float())  # every kept position got its own token
    assert (placed()[~kept] == -1).all()
    model.decoder_pos_order = "reference"
    assert (placed()[kept] != torch.nonzero(kept)[:, 1].float()).any()  # the released code's mismatch
    assert (placed()[~kept] == -1).all()


@pytest.mark.parametrize(
    "name,size",
    [
        ("umae_swin_pico_128", None),
        ("umae_pvt_pico_128", None),
        ("umae_vit_pico_patch8", None),
        ("umae_swin_pico_128", (64, 128)),
        ("umae_pvt_pico_128", (128, 64)),
        ("umae_vit_pico_patch8", (32, 48)),
    ],
)
def test_ummae_forward_loss_on_dropped_only_and_encoder_ignores_dropped_pixels(name, size):
    torch.manual_seed(0)
    model = create_method(name, **({"img_size": size} if size else {})).eval()
    h, w = (model.img_size,) * 2 if isinstance(model.img_size, int) else model.img_size
    x = torch.randn(2, 3, h, w)
    torch.manual_seed(7)
    us, ids, sm = model.draw_masks(2, "cpu")
    lat = model.encode(x, ids, sm)
    dropped_px = us.view(2, *model.grid).repeat_interleave(model.patch_size, 1).repeat_interleave(model.patch_size, 2)
    x2 = x.masked_fill(dropped_px.bool().unsqueeze(1), 5.0)
    assert torch.allclose(model.encode(x2, ids, sm), lat, atol=1e-5)
    loss, out = model({"image": x})
    assert torch.all(out["mask"].sum(1) == 0.75 * out["mask"].shape[1])
    assert torch.all(out["secondary"].sum(1) == ids.shape[1] - int(ids.shape[1] * 0.75))
    assert torch.all((out["mask"] * out["secondary"]) == 0)  # SM patches are input-masked, not in the loss


@pytest.mark.parametrize("name", ["umae_swin_pico_128", "umae_pvt_pico_128"])
@pytest.mark.parametrize("overlapping_stem", [False, True])
def test_embed_kept_equals_compacting_the_full_embedding_in_values_and_gradients(name, overlapping_stem):
    """A patchwise stem embeds the compacted pixels (a quarter of the work); the tokens and the stem's gradients
    are those of embedding the whole image and compacting. A stem whose windows overlap (kernel 7, stride 4) must
    take the whole-image path, and gives the same too."""
    torch.manual_seed(0)
    enc = create_method(name).io
    if overlapping_stem:
        old = enc.stem_conv()
        new = torch.nn.Conv2d(old.in_channels, old.out_channels, 7, old.stride, padding=3)
        if hasattr(enc, "stages") and not hasattr(enc, "patch_embed"):
            enc.stages[0].patch_embed.proj = new
        else:
            enc.patch_embed.proj = new
    grid = (8, 8)
    x = torch.randn(2, 3, 128, 128)
    ids = kept_block_order(uniform_sampling(2, grid, generator=torch.Generator().manual_seed(5)), grid)
    weight = enc.stem_conv().weight
    fast = enc.embed_kept(x, ids, grid)
    full = compact(enc.embed(x), ids, grid)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(full)
    g_fast, g_full = (torch.autograd.grad(t, weight, g)[0] for t in (fast, full))
    torch.testing.assert_close(g_fast, g_full, atol=1e-4, rtol=1e-4)
    assert g_full.abs().sum() > 0


def test_sizes_that_break_window_rules_name_valid_sizes():
    with pytest.raises(ValueError, match=r"Valid sides up to 512 px: \[32, 64, 128, 256, 512\]"):
        timm.create_model("mimswin_tiny_patch4_window16_256", img_size=224)
    with pytest.raises(ValueError, match=r"224x256 px does not fit .* Valid sides"):
        timm.create_model("mimswin_tiny_patch4_window16_256", img_size=(224, 256))
    with pytest.raises(ValueError, match="divisible by 64"):
        create_method("umae_swin_pico_128", img_size=32)
    with pytest.raises(ValueError, match="divisible by 64 .* 96x128 px"):
        create_method("umae_pvt_pico_128", img_size=(96, 128))
    with pytest.raises(ValueError, match="Valid sides"):
        timm.create_model("mimpvt_small_256", img_size=200)
    with pytest.raises(ValueError, match="square images only"):
        create_method("mixmae_swin_pico_128", img_size=(64, 128))
    with pytest.raises(ValueError, match="square images only"):
        create_method("coma_dyvit_pico_128", img_size=(64, 128))
    with pytest.raises(ValueError, match="only a plain ViT"):
        create_method("umae_swin_pico_128", sampling="random")
