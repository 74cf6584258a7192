import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mimkit.masking import block_mask
from mimkit.methods import create_method
from mimkit.patches import patchify


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.sampled_from([1, 2, 4, 8]), st.floats(0.1, 0.9), st.integers(1, 3))
def test_block_mask_counts_and_cells(gr, gc, unit, ratio, n):
    mask = block_mask(n, (gr * unit, gc * unit), unit, ratio)
    cells = mask.view(n, gr, unit, gc, unit)
    assert torch.all(cells.amin(dim=(2, 4)) == cells.amax(dim=(2, 4)))  # whole cells only
    assert torch.all(cells[:, :, 0, :, 0].sum(dim=(1, 2)) == math.ceil(gr * gc * ratio))


def test_simmim_counts_at_paper_settings():
    m = block_mask(2, (48, 48), 8, 0.6)  # Swin at 192 px: 6x6 cells of 32 px, 22 masked
    assert torch.all(m.sum(1) == 22 * 64)


@pytest.mark.parametrize("name", ["simmim_swin_pico_128", "simmim_pvt_pico_128", "simmim_vit_pico_patch8"])
def test_simmim_l1_on_masked_pixels_only(name):
    torch.manual_seed(0)
    model = create_method(name)
    s = model.img_size
    x = torch.randn(2, 3, s, s)
    loss, out = model({"image": x})
    assert model.lr_base_batch == 512 and model.default_grad_clip == 5.0 and model.betas == (0.9, 0.999)
    l1 = (out["pred"] - patchify(x, model.patch_size)).abs().mean(-1)
    assert torch.allclose(loss, (l1 * out["mask"]).sum() / out["mask"].sum(), atol=1e-5)
    pred = out["pred"].detach().requires_grad_()
    lossfn = ((pred - patchify(x, model.patch_size)).abs().mean(-1) * out["mask"]).sum() / out["mask"].sum()
    lossfn.backward()
    assert torch.all(pred.grad[out["mask"] == 0] == 0)


@pytest.mark.parametrize("name", ["simmim_swin_pico_128", "simmim_pvt_pico_128"])
def test_simmim_encoder_sees_mask_tokens_not_masked_pixels(name):
    torch.manual_seed(0)
    model = create_method(name).eval()
    x = torch.randn(1, 3, 128, 128)
    mask = block_mask(1, model.grid, 8, 0.6, generator=torch.Generator().manual_seed(0)).view(1, *model.grid)
    px = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).bool().unsqueeze(1)
    with torch.no_grad():
        a = model.encoder.encode_masked(x, mask, model.mask_token)
        b = model.encoder.encode_masked(x.masked_fill(px, 9.0), mask, model.mask_token)
    assert torch.allclose(a, b, atol=1e-5)


def test_no_weight_decay_on_mask_token_position_bias_and_norms():
    from mimkit.methods import create_method

    for name in ("simmim_swin_pico_128", "simmim_mixswin_pico_128"):
        model = create_method(name)
        groups = model.param_groups(0.05)
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        names = {n: id(p) in decayed for n, p in model.named_parameters()}
        assert names["mask_token"] is False
        assert not any(v for n, v in names.items() if "pos_mlp" in n or "relative_position_bias_table" in n)
        assert not any(v for n, v in names.items() if "norm" in n or n.endswith(".bias"))
        assert any(v for n, v in names.items() if n.endswith("qkv.weight"))  # the weight matrices still decay
