import pytest
import torch

from mimkit.methods import create_method, list_methods, method_options


def pico(**kw):
    torch.manual_seed(0)
    return create_method("mae_vit_pico_patch8", img_size=32, **kw)


def test_registry_lists_mae_sizes_and_rejects_unknown_options():
    names = list_methods()
    for size in ("pico_patch8", "tiny_patch16", "base_patch16", "large_patch16", "huge_patch14"):
        assert f"mae_vit_{size}" in names
    assert method_options("mae_vit_base_patch16")["decoder_depth"] == 8
    with pytest.raises(ValueError, match="has no option 'mask_ration'|has no option mask_ration"):
        create_method("mae_vit_pico_patch8", mask_ration=0.5)
    with pytest.raises(ValueError, match="Did you mean"):
        create_method("mae_vit_bse_patch16")


def test_forward_shapes_and_mask_ratio():
    model = pico()
    loss, out = model({"image": torch.randn(3, 3, 32, 32)})
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert out["pred"].shape == (3, 16, 8 * 8 * 3)
    assert torch.all(out["mask"].sum(1) == 12)  # 16 patches, int(16 * 0.25) = 4 visible


def test_encoder_sees_only_visible_patches():
    model = pico().eval()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    latent, draw = model.forward_encoder(x, 0.75)
    hidden = draw.mask[0].reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1).bool()
    x2 = x.clone()
    x2[:, :, hidden] = 100.0  # change only pixels of sample 0's masked patches
    torch.manual_seed(1)
    latent2, _ = model.forward_encoder(x2, 0.75)
    assert torch.allclose(latent[0], latent2[0], atol=1e-5)


def test_base_model_has_paper_parameter_count():
    model = create_method("mae_vit_base_patch16")
    enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert 85.5e6 < enc < 86.5e6  # ViT-B/16: 86 M
    assert not model.encoder.pos_embed.requires_grad  # fixed sin-cos


def test_tiny_model_overfits_a_fixed_batch():
    model = pico(mask_ratio=0.5)
    batch = {"image": torch.randn(4, 3, 32, 32)}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(150):
        torch.manual_seed(0)  # same mask every step: a pure memorisation task
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first, (first, loss.item())


def test_features_for_knn():
    model = pico()
    f = model.extract_features(torch.randn(5, 3, 32, 32))
    assert f.shape == (5, 96)
    assert model.extract_features(torch.randn(5, 3, 32, 32), pool="cls").shape == (5, 96)
