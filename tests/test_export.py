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


def test_export_carries_the_runs_input_size_and_normalization_to_timm(tmp_path, capsys):
    """A 2-channel encoder at 32x48 with its run's mean/std: the printed call and create_timm_from_export give timm's
    resolve_data_config those values, not the architecture's 3-channel ImageNet defaults."""
    from timm.data import resolve_data_config

    from mimkit.cli import main

    model = _trained_like("mae_vit_pico_patch8", img_size=(32, 48), in_chans=2)
    path = tmp_path / "enc.safetensors"
    export_encoder(model, path, mean=[0.25, 0.5], std=[0.125, 0.0625])
    net = create_timm_from_export(path)
    data = resolve_data_config({}, model=net)
    assert data["input_size"] == (2, 32, 48) and data["mean"] == (0.25, 0.5) and data["std"] == (0.125, 0.0625)
    x = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(x), model.encoder.forward_features(x), atol=1e-5)
    # the CLI prints the same overlay, from the run's saved config
    from mimkit.pretraining import pretrain

    from conftest import make_folder, pico_config

    pretrain(pico_config(make_folder(tmp_path / "imgs"), tmp_path / "run", epochs=1, max_steps=1, mean=[0.4, 0.5, 0.6]))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "input_size=(3, 32, 32), mean=(0.4, 0.5, 0.6), std=(0.229, 0.224, 0.225)" in printed
