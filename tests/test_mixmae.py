import pytest
import timm
import torch

from mimkit.cli import main
from mimkit.methods import create_method
from mimkit.patches import normalized_target, patchify

from conftest import cli_finetune, cli_pretrain, exported_twin, fit_fixed_batch, make_folder


def _model(**kw):
    torch.manual_seed(0)
    return create_method("mixmae_swin_pico_128", **kw)


def _image_loss(model, out, x, i):
    target = normalized_target(patchify(x, model.patch_size))
    return (((out["pred"][i] - target[i]) ** 2).mean(-1) * out["mask"][i]).sum()


@pytest.mark.parametrize("pairing,granularity", [("flip", "batch"), ("flip", "pair"), ("once", "batch")])
def test_no_leakage_between_mixed_images(pairing, granularity):
    model = _model(pairing=pairing, mask_granularity=granularity)
    x = torch.randn(4, 3, 128, 128, requires_grad=True)
    torch.manual_seed(1)
    _, out = model({"image": x})
    _image_loss(model, out, x, 1).backward()  # image 1's partner is image 2 (flip pairing: i <-> B-1-i)
    g = x.grad.abs().flatten(1).sum(1)
    assert g[1] > 0
    assert g[0] == 0 and g[2] == 0 and g[3] == 0


@pytest.mark.parametrize("pairing,n", [("flip", 4), ("flip", 5), ("once", 4), ("once", 5)])
def test_unmixed_prediction_covers_each_patch_once(pairing, n):
    model = _model(pairing=pairing)
    torch.manual_seed(2)
    _, out = model({"image": torch.randn(n, 3, 128, 128)})
    cells = 16
    if pairing == "flip":
        assert torch.equal(out["mask"], torch.ones(n, cells))  # every patch of every image, exactly once
    else:
        # each pair: the two images' predicted patches partition the cell grid; an odd middle image covers itself
        for j in range(n // 2):
            assert torch.equal(out["mask"][j] + out["mask"][n - 1 - j], torch.ones(cells))
        if n % 2:
            assert torch.equal(out["mask"][n // 2], torch.ones(cells))
        assert out["mask"][0].sum() == int(cells * 0.5)


def test_mixing_mask_ratio_and_granularity():
    m = _model().draw_mask(6, "cpu", torch.Generator().manual_seed(0))
    assert m.shape == (1, 16) and m.sum() == 8
    pair = _model(mask_granularity="pair").draw_mask(6, "cpu", torch.Generator().manual_seed(0))
    assert pair.shape == (6, 16) and (pair.sum(1) == 8).all()
    assert torch.equal(pair, pair.flip(0))  # the two inputs of a pair share their mask
    assert not torch.equal(pair[0], pair[1])


def test_no_patch_merge_straddles_two_groups():
    model = _model()
    enc = model.encoder
    groups = model.draw_mask(1, "cpu").view(1, *model.grid)
    res = model.img_size // enc.patch_size
    for _ in enc.stages[1:]:  # the map entering each merge: every 2x2 block holds one group only
        gmap = groups.repeat_interleave(res // model.grid[0], 1).repeat_interleave(res // model.grid[1], 2)
        blocks = gmap.view(1, res // 2, 2, res // 2, 2)
        assert (blocks.amax(dim=(2, 4)) == blocks.amin(dim=(2, 4))).all()
        res //= 2
    with pytest.raises(ValueError, match="does not fit this MixMAE Swin"):
        create_method("mixmae_swin_pico_128", img_size=112)


def test_grouped_attention_equals_encoding_each_image_alone():
    model = _model().eval()
    enc = model.encoder
    x = torch.randn(2, 3, 128, 128)
    groups = torch.zeros(1, 4, 4)
    groups[:, :, 2:] = 1  # left half from image 0, right half from image 1
    tok = enc.embed(x)
    m = groups.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(-1)
    with torch.no_grad():
        mixed = enc.forward_tokens(tok[:1] * (1 - m) + tok[1:] * m, groups)
        alone = enc.forward_tokens(tok[:1] * (1 - m) + torch.randn_like(tok[1:]) * m, groups)
    assert torch.allclose(mixed[..., :2, :], alone[..., :2, :], atol=1e-5)  # image 0's cells ignore the partner
    assert not torch.allclose(mixed[..., 2:, :], alone[..., 2:, :], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_mask_is_safe_in_half_precision(dtype):
    model = _model().eval()
    x = torch.randn(2, 3, 128, 128)
    groups = model.draw_mask(2, "cpu").view(1, *model.grid)
    with torch.no_grad():
        ref = model.encoder.forward_tokens(model.encoder.embed(x), groups)
        half = model.encoder.to(dtype)
        out = half.forward_tokens(half.embed(x.to(dtype)), groups)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05


def test_encoder_api_export_and_features_only(tmp_path):
    model = _model()
    meta, net = exported_twin(model, tmp_path / "mix.safetensors")
    assert meta["timm_model"] == "mixswin_pico_patch4_window16_128"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(net.forward_features(x), model.encoder.eval().forward_features(x), atol=1e-5)
    feats = timm.create_model(meta["timm_model"], features_only=True)(x)
    assert [f.shape[1:] for f in feats] == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert timm.create_model("mixswin_base_patch4_window14_224").num_features == 1024


def test_loss_decreases_on_a_fixed_batch():
    model = _model()
    x = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8), size=128, mode="bicubic")  # smooth images
    first, last = fit_fixed_batch(model, {"image": x}, 100)  # at 60 steps it ended near 0.5x, on either side
    assert last < 0.5 * first, (first, last)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="pairing"):
        create_method("mixmae_swin_pico_128", pairing="random")
    with pytest.raises(ValueError, match="mixswin"):
        create_method("mixmae_swin_pico_128", encoder="mimswin_pico_patch4_window16_128")


def test_mixmae_pretrains_and_finetunes_from_the_cli(tmp_path):
    data = make_folder(tmp_path / "data", per_class=(8, 4))
    run = tmp_path / "run"
    assert cli_pretrain(data, run, "mixmae_swin_pico_128")["steps"] == 4
    assert main(["visualize", str(run), "--data", str(data), "--num", "2", "--out", str(tmp_path / "m.png")]) == 0
    ft = cli_finetune(data, run, tmp_path / "ft")
    assert ft["model"] == "finetune:mixswin_pico_patch4_window16_128"


@pytest.mark.parametrize(
    "name,kw",
    [
        ("mixmae_swin_pico_128", {}),
        ("mixmae_swin_pico_128", {"pairing": "once"}),
        ("lomar_vit_pico_patch8", {}),
        ("coma_dyvit_pico_128", {"teacher": "ema"}),
    ],
)
def test_bf16_autocast_train_and_eval_steps(name, kw):
    from mimkit.engine.trainer import autocast_context

    torch.manual_seed(0)
    model = create_method(name, **kw)
    s = model.img_size
    for train in (True, False):
        model.train(train)
        with autocast_context("bf16", torch.device("cpu"), True):
            loss, out = model({"image": torch.randn(4, 3, s, s)})
        assert torch.isfinite(loss) and torch.isfinite(out["pred"].float()).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_map_that_is_not_whole_windows_is_named_not_a_reshape_error():
    """knn --img-size 160 of a MixMAE run (windows of 16 tokens) printed torch's "shape '[1, 2, 16, 2, 16, 32]' is
    invalid for input of size 51200"; the size error now says what does not fit."""
    model = create_method("mixmae_swin_pico_128").eval()
    assert model.extract_features(torch.zeros(1, 3, 256, 256)).shape[0] == 1
    with pytest.raises(ValueError, match="a 40x40 token map cannot be split into 16x16 windows"):
        model.extract_features(torch.zeros(1, 3, 160, 160))
