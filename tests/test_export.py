import timm
import torch
from safetensors.torch import load_file

from mimkit.export import create_timm_from_export, export_encoder
from mimkit.methods import create_method


def _trained_like(name, **kw):
    torch.manual_seed(0)
    model = create_method(name, **kw)
    with torch.no_grad():  # move away from init so a silent non-load would be visible
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_export_loads_strictly_with_timms_default_call(tmp_path):
    model = _trained_like("mae_vit_pico_patch8")
    path = tmp_path / "enc.safetensors"
    meta = export_encoder(model, path)
    assert meta["timm_model"] == "vit_pico_patch8_64" and meta["head"] == "1000"
    # exactly the documented call; load_pretrained is strict when num_classes matches, so any key mismatch raises
    net = timm.create_model("vit_pico_patch8_64", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(x), model.encoder.forward_features(x), atol=1e-5)
    sd = load_file(str(path))
    assert set(sd) == set(net.state_dict())


def test_encoder_only_export_into_a_real_timm_architecture(tmp_path):
    model = _trained_like("mae_vit_tiny_patch16", img_size=64, encoder_args={"depth": 2})
    path = tmp_path / "tiny.safetensors"
    export_encoder(model, path, head_classes=0)
    assert not any(k.startswith("head") for k in load_file(str(path)))
    # vit_tiny_patch16_224's own pretrained config uses a custom .npz loader, hence custom_load=False
    net = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        num_classes=0,
        img_size=64,
        depth=2,
        pretrained_cfg_overlay=dict(file=str(path), custom_load=False),
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(x), model.encoder.forward_features(x), atol=1e-5)
    # a new classifier: every encoder weight loaded, only the head is new
    clf = create_timm_from_export(path, num_classes=5)
    assert clf.head.out_features == 5
    assert torch.equal(
        clf.state_dict()["blocks.1.mlp.fc2.weight"], model.encoder.state_dict()["blocks.1.mlp.fc2.weight"]
    )
