import json

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


def test_an_export_gives_the_features_of_its_method(tmp_path):
    """knn and linprobe evaluate an export by the rule a method evaluates its encoder with (global_features): the
    same features for a ViT (patch-token average), a Beit (LoMaR: average, then timm's fc_norm) and a Swin (map
    average), 2 channels at 32 px or the pico size, and the export's channel count and normalization."""
    from mimkit.loading import load_encoder

    for name, kw in (
        ("mae_vit_pico_patch8", dict(img_size=32, in_chans=2)),
        ("lomar_vit_pico_patch8", {}),
        ("umae_swin_pico_128", {}),
    ):
        model = _trained_like(name, **kw)
        chans = kw.get("in_chans", 3)
        path = tmp_path / f"{name}.safetensors"
        export_encoder(model, path, mean=[0.25] * chans, std=[0.5] * chans)
        loaded, known = load_encoder(path)
        assert loaded.in_chans == chans and known == {"in_chans": chans, "mean": [0.25] * chans, "std": [0.5] * chans}
        size = kw.get("img_size", model.img_size)
        x = torch.randn(3, chans, size, size)
        for pool in ("avg", "cls"):
            want = model.extract_features(x, pool=pool)
            got = loaded.extract_features(x, pool=pool)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (name, pool)
            assert want.abs().sum() > 0
        if name.startswith("lomar"):  # a Beit: timm's own pre-logits features (the average, then fc_norm)
            net = loaded.encoder
            with torch.no_grad():
                timms = net.forward_head(net.forward_features(x), pre_logits=True)
            assert torch.allclose(loaded.extract_features(x), timms, atol=1e-5)


def test_knn_and_linprobe_take_an_export_and_a_finetuning_run(tmp_path, tiny_folder, capsys):
    """`mimkit knn EXPORT` scores what `mimkit knn RUN` does; a fine-tuning run is evaluated by its classifier's
    features (the same as its export's); visualize, which needs the decoder, names what to give instead."""
    from mimkit.cli import main

    from conftest import _cli_json, cli_finetune, cli_pretrain

    run, ft = tmp_path / "run", tmp_path / "ft"
    cli_pretrain(tiny_folder, run, "mae_vit_pico_patch8", "--img-size", "32")
    cli_finetune(tiny_folder, run, ft)
    for source in (run, ft):
        assert main(["export", str(source), "--out", str(source) + ".safetensors"]) == 0
    capsys.readouterr()

    def knn(source):
        return _cli_json(["knn", str(source), "--data", str(tiny_folder), "--k", "3", "--json"])

    def features(source):
        from mimkit.loading import is_encoder_source, load_encoder, load_pretrained

        model = load_encoder(source)[0] if is_encoder_source(source) else load_pretrained(source)[0]
        return model.eval().extract_features(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))

    for a, b in ((run, f"{run}.safetensors"), (ft, f"{ft}.safetensors")):
        scored_a, scored_b = knn(a), knn(b)
        assert scored_a["top1"] == scored_b["top1"] and scored_a["n_train"] == scored_b["n_train"] == 24
        assert torch.allclose(features(a), features(b), atol=1e-5)
    assert not torch.allclose(features(run), features(ft), atol=1e-3)  # the fine-tuned encoder is another one
    rc = main(["linprobe", f"{run}.safetensors", "--data", str(tiny_folder), "--epochs", "1", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n_val"] == 8
    rc = main(["visualize", f"{run}.safetensors", "--data", str(tiny_folder), "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "an encoder without its decoder" in err and err.count("\n") == 1


def test_knn_takes_released_vit_weights(tmp_path, tiny_folder, capsys):
    """Released MAE-layout ViT weights (a {"model": state} file) are evaluated as the ViT they hold: the patch-token
    average of timm's own model with those weights, ImageNet's normalization."""
    from mimkit.cli import main
    from mimkit.loading import load_encoder

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=0).eval()
    torch.save({"model": vit.state_dict()}, tmp_path / "released.pth")
    loaded, known = load_encoder(tmp_path / "released.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.extract_features(x), vit.forward_features(x)[:, 1:].mean(1), atol=1e-5)
    assert known == {} and loaded.img_size == 32
    assert main(["knn", str(tmp_path / "released.pth"), "--data", str(tiny_folder), "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_val"] == 8
