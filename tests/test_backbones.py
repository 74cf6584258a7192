import pytest
import timm
import torch

from mimkit.export import export_encoder
from mimkit.methods import create_method


@pytest.mark.parametrize("name,size", [("mimswin_pico_patch4_window16_128", 128), ("mimpvt_pico_128", 128)])
def test_features_only_strides_4_to_32(name, size):
    net = timm.create_model(name, features_only=True)
    feats = net(torch.randn(2, 3, size, size))
    assert net.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[-1] for f in feats] == [size // 4, size // 8, size // 16, size // 32]
    assert [f.shape[1] for f in feats] == net.feature_info.channels()


def test_paper_sizes_parameter_counts():
    swin_t = timm.create_model("mimswin_tiny_patch4_window16_256")
    assert 27.5e6 < sum(p.numel() for p in swin_t.parameters()) < 29e6  # Swin-T: 28 M
    pvt_s = timm.create_model("mimpvt_small_256", num_classes=0)
    # PVT-S is 24.5 M with k x k reduction convs; pooling reduction with 1x1 convs has ~4.3 M fewer weights
    assert 19e6 < sum(p.numel() for p in pvt_s.parameters()) < 21e6


@pytest.mark.parametrize("method", ["umae_swin_pico_128", "umae_pvt_pico_128", "simmim_swin_pico_128"])
def test_export_and_strict_reload_into_registered_timm_model(method, tmp_path):
    torch.manual_seed(0)
    model = create_method(method).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "enc.safetensors"
    meta = export_encoder(model, path)
    net = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(x), model.encoder.forward_features(x), atol=1e-5)


def test_same_weights_run_compact_and_full_resolution():
    torch.manual_seed(0)
    model = create_method("umae_swin_pico_128")
    loss, _ = model({"image": torch.randn(2, 3, 128, 128)})  # compact (window 8)
    assert model.encoder.forward_features(torch.randn(2, 3, 128, 128)).shape == (2, 4, 4, 256)  # full (window 16)
    assert model.extract_features(torch.randn(2, 3, 256, 256)).shape == (2, 256)  # larger image, same weights
