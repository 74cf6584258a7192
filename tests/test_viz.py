import pytest
import torch
from PIL import Image

from mimkit.methods import create_method
from mimkit.viz import reconstruction_panels, save_reconstruction_figure

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_figure_is_written_with_expected_size(tmp_path):
    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8", img_size=32)
    path = save_reconstruction_figure(model, torch.randn(3, 3, 32, 32), MEAN, STD, tmp_path / "f.png")
    im = Image.open(path)
    scale = 160 // 32
    assert im.size == (4 * (32 * scale + 4) + 4, 18 + 3 * (32 * scale + 4) + 4 + 30)


def test_visible_stats_mode_uses_nothing_from_the_masked_area():
    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    _, out = (torch.manual_seed(5), model({"image": x}))[1]
    hidden = out["hidden"].reshape(2, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2).bool()
    x2 = x.clone()
    x2.masked_fill_(hidden.unsqueeze(1), 3.0)
    a = reconstruction_panels(model, x, MEAN, STD, stats="visible", seed=5)
    b = reconstruction_panels(model, x2, MEAN, STD, stats="visible", seed=5)
    assert torch.allclose(a[2], b[2], atol=1e-5)  # reconstruction unchanged
    c = reconstruction_panels(model, x2, MEAN, STD, stats="target", seed=5)
    assert not torch.allclose(a[2], c[2], atol=1e-3)  # the leaking mode does see the masked area


@pytest.mark.parametrize(
    "name",
    [
        "mae_vit_pico_patch8",
        "umae_swin_pico_128",
        "umae_pvt_pico_128",
        "umae_vit_pico_patch8",
        "simmim_swin_pico_128",
        "simmim_vit_pico_patch8",
        "lomar_vit_pico_patch8",
        "mixmae_swin_pico_128",
        "coma_dyvit_pico_128",
    ],
)
def test_figure_for_every_method(name, tmp_path):
    torch.manual_seed(0)
    model = create_method(name)
    s = model.img_size
    path = save_reconstruction_figure(model, torch.randn(2, 3, s, s), MEAN, STD, tmp_path / f"{name}.png")
    scale = max(1, 160 // s)
    assert Image.open(path).size == (4 * (s * scale + 4) + 4, 18 + 2 * (s * scale + 4) + 4 + 30)
