"""Encoder interfaces (mimkit/models/interfaces.py): which backbone serves which protocol, what the ViT view computes,
and the construction error for a method paired with an encoder that cannot serve it."""

import copy

import pytest
import torch

from mimkit.methods import create_method
from mimkit.models import create_encoder
from mimkit.models.interfaces import (
    MaskTokenEncoder,
    MixedTokenEncoder,
    RelPosViTInterface,
    UniformCompactEncoder,
    VisibleTokenEncoder,
    ViTInterface,
    WindowSequenceEncoder,
    supports,
)
from mimkit.patches import patchify_channels_first

ALL = (VisibleTokenEncoder, MaskTokenEncoder, UniformCompactEncoder, MixedTokenEncoder, WindowSequenceEncoder)


@pytest.mark.parametrize(
    "name,size,served",
    [
        ("vit_pico_patch8_64", 64, {VisibleTokenEncoder, MaskTokenEncoder}),
        ("mimswin_pico_patch4_window16_128", 128, {MaskTokenEncoder, UniformCompactEncoder}),
        ("mimpvt_pico_128", 128, {MaskTokenEncoder, UniformCompactEncoder}),
        ("mixswin_pico_patch4_window16_128", 128, {MaskTokenEncoder, MixedTokenEncoder}),
        ("dyvit_pico_128", 128, {VisibleTokenEncoder}),
        ("rpbvit_pico_patch8_64", 64, {WindowSequenceEncoder}),
    ],
)
def test_each_backbone_serves_exactly_its_protocols(name, size, served):
    encoder = create_encoder(name, img_size=size)
    assert {p for p in ALL if supports(encoder, p)} == served


def test_vit_view_of_all_units_in_order_is_timms_forward_features():
    torch.manual_seed(0)
    vit = create_encoder("vit_pico_patch8_64", img_size=64).eval()
    view = ViTInterface(vit)
    img = torch.randn(2, 3, 64, 64)
    ids = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(view.encode_visible(img, ids), vit.forward_features(img), atol=1e-5)
        shuffled = torch.stack([torch.randperm(64) for _ in range(2)])[:, :16]
        part = view.encode_visible(img, shuffled)
        replaced = view.encode_visible(img, shuffled, torch.ones(2, 16), torch.zeros(96))
    assert part.shape == (2, 17, 96)
    assert not torch.allclose(part, replaced, atol=1e-3)  # the token replaced the units' inputs


@pytest.mark.parametrize("padded_stem", [False, True])
def test_vit_embeds_the_kept_patches_as_timm_embeds_them_all(padded_stem):
    """The kept patches' pixels mapped by the patch embedding's weights == timm's patch embedding of every patch,
    then kept: tokens and stem gradients. A stem that is not one linear map per patch (padded) takes timm's path."""
    torch.manual_seed(0)
    vit = create_encoder("vit_pico_patch8_64", img_size=64)
    if padded_stem:
        old = vit.patch_embed.proj
        vit.patch_embed.proj = torch.nn.Conv2d(3, old.out_channels, 9, 8, padding=4)
    view = ViTInterface(vit)
    img = torch.randn(2, 3, 64, 64)
    ids = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    weight = vit.patch_embed.proj.weight
    fast = view.embed_kept(img, ids)
    full = torch.gather(vit.patch_embed(img), 1, ids.unsqueeze(-1).expand(-1, -1, 96))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(full)
    g_fast, g_full = (torch.autograd.grad(t, weight, g)[0] for t in (fast, full))
    torch.testing.assert_close(g_fast, g_full, atol=1e-4, rtol=1e-4)
    assert g_full.abs().sum() > 0


def test_relpos_view_of_the_whole_grid_in_raster_order_is_timms_forward_features():
    torch.manual_seed(0)
    beit = create_encoder("rpbvit_pico_patch8_64", img_size=64).eval()
    for blk in beit.blocks:  # timm starts the tables at zero: give the bias something to do
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=0.5)
    view = RelPosViTInterface(beit)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = view.encode_sequences(view.embed_patches(patchify_channels_first(img, 8)))
        assert torch.allclose(beit.norm(tokens), beit.forward_features(img), atol=1e-5)
        flipped = view.encode_sequences(view.embed_patches(patchify_channels_first(img, 8)).flip(1))
    assert not torch.allclose(flipped[:, 1:].flip(1), tokens[:, 1:], atol=1e-3)  # the bias sees the order


@pytest.mark.parametrize(
    "preset,encoder,method",
    [
        ("lomar_vit_pico_patch8", "vit_pico_patch8_64", "LoMaR"),
        ("mixmae_swin_pico_128", "mimswin_pico_patch4_window16_128", "MixMAE"),
        ("simmim_swin_pico_128", "dyvit_pico_128", "SimMIM"),
        ("coma_dyvit_pico_128", "mimpvt_pico_128", "CoMA"),
        ("umae_swin_pico_128", "mixswin_pico_patch4_window16_128", "UM-MAE"),
    ],
)
def test_unsupported_pairing_fails_at_construction_naming_both(preset, encoder, method):
    with pytest.raises(ValueError) as err:
        create_method(preset, encoder=encoder)
    assert method in str(err.value) and f"'{encoder}'" in str(err.value)


def test_mae_runs_on_dyvit_through_the_visible_token_protocol():
    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8", encoder="dyvit_pico_128", img_size=128)
    loss, out = model({"image": torch.randn(2, 3, 128, 128)})
    assert out["pred"].shape == (2, 16, 32 * 32 * 3) and torch.isfinite(loss) and loss > 0


def test_the_view_follows_the_model_through_a_deep_copy_and_is_not_a_submodule():
    model = create_method("umae_swin_pico_128")
    twin = copy.deepcopy(model)
    assert twin.io is twin.encoder and model.io is model.encoder
    assert not any(k.startswith("io.") for k in model.state_dict())
