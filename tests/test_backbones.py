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
    # the released UM-MAE pvt_small_256 without its head, counted against that code (docs/design.md)
    assert sum(p.numel() for p in pvt_s.parameters()) == 21_033_728


def test_pvt_has_the_released_layout_and_pvt_v1_as_an_option():
    released = timm.create_model("mimpvt_pico_128", num_classes=0)
    v1 = timm.create_model("mimpvt_pico_128", num_classes=0, embed_norm=True, reduce_every_stage=False)
    keys, v1_keys = set(released.state_dict()), set(v1.state_dict())
    assert not any(".patch_embed.norm." in k for k in keys)  # a bare strided conv
    assert all(f"stages.{s}.blocks.0.attn.sr.weight" in keys for s in range(4))  # ratio 1 (stage 4) reduced too
    assert v1_keys - keys == {f"stages.{s}.patch_embed.norm.{p}" for s in range(4) for p in ("weight", "bias")}
    assert {k.split(".attn.")[0] for k in keys - v1_keys} == {"stages.3.blocks.0"}  # v1: no reduction at ratio 1
    x = torch.randn(2, 3, 128, 128)
    torch.manual_seed(0)
    out = released(x)
    released.stages[3].blocks[0].attn.sr.weight.data.mul_(2)  # the ratio-1 reduction is used
    assert out.shape == (2, 256) and not torch.allclose(out, released(x))


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


def _mimkit_backbones() -> list[str]:
    return sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("mimkit."))


def test_every_mimkit_backbone_builds_with_features_only():
    """timm's features_only for every backbone mimkit registers (the small ViTs failed: IndexError); the pico and nano
    ones run, the rest are built on the meta device."""
    names = _mimkit_backbones()
    assert {"vit_pico_patch8_64", "mimswin_tiny_patch4_window16_256", "dyvit_base_224"} <= set(names)
    for name in names:
        if "pico" in name or "nano" in name:
            net = timm.create_model(name, features_only=True)
            feats = net(torch.randn(1, 3, *timm.models.get_pretrained_cfg(name).input_size[1:]))
            assert len(feats) == len(net.feature_info.channels()) >= 3, name
            assert [f.shape[1] for f in feats] == net.feature_info.channels(), name
        else:
            with torch.device("meta"):
                assert len(timm.create_model(name, features_only=True).feature_info.channels()) >= 3, name
