"""Rectangular inputs (--img-size HEIGHT WIDTH): every method that allows them trains on them, the others and sizes
that break a backbone's window rules give one clear error, and the saved size serves evaluation."""

import json

import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.data.transforms import eval_transform, pretrain_transform
from mimkit.methods import create_method

from conftest import SAMPLES, pico_config


@pytest.mark.parametrize(
    "name,size",
    [
        ("mae_vit_pico_patch8", (48, 80)),
        ("simmim_vit_pico_patch8", (32, 64)),
        ("simmim_swin_pico_128", (128, 64)),
        ("simmim_pvt_pico_128", (64, 128)),
        ("lomar_vit_pico_patch8", (48, 64)),
        ("umae_vit_pico_patch8", (32, 64)),
        ("umae_swin_pico_128", (64, 128)),
    ],
)
def test_methods_train_on_rectangles(name, size):
    torch.manual_seed(0)
    model = create_method(name, img_size=size)
    assert tuple(model.img_size) == size
    images = torch.randn(2, 3, *size)
    loss, out = model({"image": images, "index": torch.arange(2)})
    loss.backward()
    target = model.target(images)
    assert torch.isfinite(loss) and out["pred"].shape == target.shape
    assert target.shape[1] == (size[0] // model.patch_size) * (size[1] // model.patch_size)
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_square_sizes_stay_ints_and_bad_sizes_are_config_errors(tmp_path):
    assert pico_config(SAMPLES, tmp_path / "a", img_size=[32, 32]).img_size == 32
    assert pico_config(SAMPLES, tmp_path / "b", img_size=[32, 48]).img_size == [32, 48]
    with pytest.raises(ConfigError, match="HEIGHT WIDTH"):
        pico_config(SAMPLES, tmp_path / "c", img_size=[32, 48, 64])
    with pytest.raises(ConfigError, match=">= 8"):
        pico_config(SAMPLES, tmp_path / "d", img_size=[32, 4])


def test_transforms_give_height_by_width():
    img = Image.new("RGB", (300, 200), (120, 30, 200))
    assert pretrain_transform((48, 80))(img).shape == (3, 48, 80)
    assert eval_transform((48, 80))(img).shape == (3, 48, 80)
    assert eval_transform(48)(img).shape == (3, 48, 48)


def test_cli_rectangles_train_evaluate_and_explain_bad_sizes(tmp_path, capsys):
    common = ["--data", str(SAMPLES), "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress"]
    out = tmp_path / "run"
    rc = main(["pretrain", "--model", "umae_swin_pico_128", "--img-size", "64", "128", *common, "--max-steps", "2",
               "--no-tensorboard", "--output", str(out)])  # fmt: skip
    assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["knn", str(out), "--data", str(SAMPLES), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["img_size"] == [64, 128]
    for model, size, says in (
        ("umae_swin_pico_128", ["64", "96"], "64x96 px does not fit window 16"),
        ("mixmae_swin_pico_128", ["64", "128"], "MixMAE takes square images only"),
        ("umae_pvt_pico_128", ["96", "128"], "divisible by 64"),
    ):
        rc = main(["pretrain", "--model", model, "--img-size", *size, *common, "--output", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and says in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
