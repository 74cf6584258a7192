"""Any number of channels at full bit depth: decoding, statistics, every method's targets, figures, the real CLI."""

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mimkit.data.decode import BadImage, load_array, load_image
from mimkit.data.transforms import compute_mean_std, eval_transform, pretrain_transform
from mimkit.methods import create_method
from mimkit.methods.registry import _REGISTRY
from mimkit.viz import display_bands, reconstruction_panels


def _gray16(path, h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w)) * 60000 + 1000).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return arr


def _bands(path, c=6, h=40, w=48, seed=0, planar=True, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    arr = (rng.random((c, h, w)) * 4000 + np.arange(c)[:, None, None] * 1000).astype(dtype)
    if planar:
        tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="separate")
    else:
        tifffile.imwrite(path, np.moveaxis(arr, 0, -1), photometric="minisblack", planarconfig="contig")
    return arr


def test_16_bit_grey_keeps_full_precision(tmp_path):
    arr = _gray16(tmp_path / "a.png")
    x = load_array(tmp_path / "a.png", in_chans=1)
    assert x.shape == (1, 40, 48) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0].numpy(), arr / 65535.0, rtol=1e-6)
    assert len(torch.unique(x)) > 1000  # 8-bit would leave at most 256 levels


@pytest.mark.parametrize("planar", [True, False])
def test_multiband_tiff_planar_or_interleaved(tmp_path, planar):
    arr = _bands(tmp_path / "b.tif", planar=planar)
    x = load_array(tmp_path / "b.tif", in_chans=6)
    assert x.shape == (6, 40, 48)
    np.testing.assert_allclose(x.numpy(), arr / 65535.0, rtol=1e-6)


def test_float_tiff_values_are_kept_and_shards_read_tiff_bytes(tmp_path):
    import io

    arr = _bands(tmp_path / "f.tif", c=4, dtype=np.float32)
    x = load_array(io.BytesIO((tmp_path / "f.tif").read_bytes()), in_chans=4)  # a shard member, no file name
    np.testing.assert_allclose(x.numpy(), arr)


def test_other_channel_counts_and_damage_are_bad_images(tmp_path):
    _bands(tmp_path / "b.tif")
    with pytest.raises(BadImage, match="has 6 channel.*--in-chans 4"):
        load_array(tmp_path / "b.tif", in_chans=4)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 40)
    with pytest.raises(BadImage, match="cannot decode"):
        load_array(tmp_path / "bad.tif", in_chans=6)
    nan = np.full((3, 16, 16), np.nan, np.float32)
    tifffile.imwrite(tmp_path / "nan.tif", nan, photometric="minisblack")
    with pytest.raises(BadImage, match="NaN"):
        load_array(tmp_path / "nan.tif", in_chans=3)
    with pytest.raises(BadImage, match="too small"):
        load_array(tmp_path / "b.tif", min_size=64, in_chans=6)


def test_three_channels_keep_the_rgb_path(tmp_path):
    _gray16(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", 1, in_chans=3)
    assert isinstance(img, Image.Image) and img.mode == "RGB"


def test_transforms_and_statistics_for_n_channels(tmp_path):
    paths = []
    for i in range(3):
        arr = np.full((5, 32, 32), (i + 1) * 6553, np.uint16)  # constant bands: mean known, std from the 3 images
        arr[1] = 65535
        tifffile.imwrite(tmp_path / f"{i}.tif", arr, photometric="minisblack")
        paths.append(str(tmp_path / f"{i}.tif"))
    mean, std = compute_mean_std(paths, in_chans=5)
    assert mean[0] == pytest.approx(0.2, abs=1e-3) and mean[1] == pytest.approx(1.0, abs=1e-3)
    assert std[1] < 1e-3 < std[0]
    x = load_array(paths[0], in_chans=5)
    out = pretrain_transform(16, mean, [s or 1.0 for s in std])(x)
    assert out.shape == (5, 16, 16)
    assert eval_transform(16, [0.5] * 5, [0.25] * 5)(x).shape == (5, 16, 16)


PICO = sorted(n for n in _REGISTRY if "pico" in n)


@pytest.mark.parametrize("name", PICO)
def test_every_method_predicts_p_p_n_pixels(name):
    torch.manual_seed(0)
    net = create_method(name, in_chans=2)
    s = net.img_size
    images = torch.randn(2, 2, s, s)
    loss, out = net({"image": images, "index": torch.arange(2)})
    loss.backward()
    assert torch.isfinite(loss)
    assert out["pred"].shape[-1] == net.target(images).shape[-1]
    assert net.target(images).shape[-1] % 2 == 0 and net.target(images).shape[-1] == net.patch_size**2 * 2
    state, timm_name, kwargs = net.export_encoder()
    assert kwargs["in_chans"] == 2  # the exported encoder rebuilds with its channel count


def test_display_bands_grey_and_triplets():
    x = torch.arange(6.0).view(1, 6, 1, 1).expand(1, 6, 2, 2)
    assert display_bands(x, [3, 2, 1])[0, :, 0, 0].tolist() == [3.0, 2.0, 1.0]
    grey = display_bands(x[:, :1])
    assert grey.shape[1] == 3 and torch.equal(grey[:, 0], grey[:, 2])
    with pytest.raises(ValueError, match="6 channel"):
        display_bands(x, [0, 1, 6])
    net = create_method("mae_vit_pico_patch8", in_chans=6, img_size=32).eval()
    panels = reconstruction_panels(net, torch.randn(2, 6, 32, 32), [0.0] * 6, [1.0] * 6, bands=[5, 0, 1])
    assert all(p.shape == (2, 3, 32, 32) for p in panels)


def test_cli_pretrains_16_bit_grey_and_6_band_tiff(tmp_path, capsys):
    from mimkit.cli import main

    (tmp_path / "g").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(8):
        _gray16(tmp_path / "g" / f"{i}.png", seed=i)
        _bands(tmp_path / "b" / f"{i}.tif", seed=i)
    common = ["--img-size", "64", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--no-progress",
              "--no-tensorboard"]  # fmt: skip
    for data, n, model in (("g", 1, "umae_swin_pico_128"), ("b", 6, "mae_vit_pico_patch8")):
        out = tmp_path / f"run-{data}"
        rc = main(["pretrain", "--data", str(tmp_path / data), "--in-chans", str(n), "--model", model, *common,
                   "--recon-every", "1", "--output", str(out)])  # fmt: skip
        captured = capsys.readouterr()
        assert rc == 0, captured.err[-2000:]
        assert json.loads(captured.out)["steps"] == 2
        ckpt = torch.load(next(out.glob("checkpoint-*.pt")), map_location="cpu", weights_only=True)
        assert ckpt["config"]["in_chans"] == n and len(ckpt["config"]["mean"]) == n  # measured, one per channel
        assert ckpt["config"]["compute_mean_std"] is True
        assert (out / "recon" / "epoch-0001.png").is_file()
        rc = main(["visualize", str(out), "--data", str(tmp_path / data), "--num", "2", "--out",
                   str(tmp_path / "v.png"), *(["--bands", "5", "0", "1"] if n == 6 else [])])  # fmt: skip
        assert rc == 0 and "wrote" in capsys.readouterr().out and (tmp_path / "v.png").is_file()
    # a 4-channel model on 6-band images: every image is skipped, and the run says why in one line
    rc = main(["pretrain", "--data", str(tmp_path / "b"), "--in-chans", "4", "--model", "mae_vit_pico_patch8", *common,
               "--output", str(tmp_path / "run-x")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "has 6 channel(s), the model takes --in-chans 4" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_finetune_from_random_init_takes_the_channel_count_and_names_a_bad_size(tmp_path, capsys):
    """The from-scratch baseline on grey data (--random-init with --in-chans 1), and an image size a pyramid cannot
    take: one line naming --img-size, exit code 2 (it was a ValueError traceback)."""
    from mimkit.cli import main

    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "g" / split / cls).mkdir(parents=True)
            for i in range(n):
                _gray16(tmp_path / "g" / split / cls / f"{i}.png", seed=i + 10 * (cls == "b"))
    common = ["--data", str(tmp_path / "g"), "--in-chans", "1", "--epochs", "1", "--batch-size", "4", "--mixup", "0",
              "--cutmix", "0", "--num-workers", "0", "--no-progress", "--no-tensorboard"]  # fmt: skip
    rc = main(["finetune", "--random-init", "umae_swin_pico_128", "--img-size", "64", *common,
               "--output", str(tmp_path / "ft")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert json.loads(captured.out[captured.out.index("{") :])["steps"] == 2
    rc = main(["finetune", "--random-init", "umae_swin_pico_128", "--img-size", "96", *common,
               "--output", str(tmp_path / "ft96")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: img_size (--img-size) = 96 px:") and "window" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_knn_linprobe_visualize_random_init_take_in_chans(tmp_path, capsys, monkeypatch):
    """The random-init baseline of an N-channel run: built with N channels, normalised with statistics measured from
    the data (one per channel); a checkpoint keeps its own channel count and a different --in-chans names it; fine-
    tuning takes a run's (or export's) channel count and normalization."""
    import mimkit.eval
    from mimkit.cli import main

    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "g" / split / cls).mkdir(parents=True)
            for i in range(n):
                _gray16(tmp_path / "g" / split / cls / f"{i}.png", seed=i + 10 * (cls == "b"))
    seen = []
    real = mimkit.eval.knn_evaluate
    monkeypatch.setattr(
        mimkit.eval,
        "knn_evaluate",
        lambda m, d, s, mean, std, **kw: seen.append((m, mean, std)) or real(m, d, s, mean, std, **kw),
    )
    data = str(tmp_path / "g")
    assert (
        main(["knn", "--random-init", "mae_vit_pico_patch8", "--img-size", "32", "--in-chans", "1", "--data", data])
        == 0
    )
    ((model, mean, std),) = seen
    assert (
        model.in_chans == 1 and len(mean) == len(std) == 1 and 0.05 < mean[0] < 0.95
    )  # 16-bit values scaled to [0, 1]
    assert "top-1" in capsys.readouterr().out
    out = tmp_path / "v.png"
    assert main(["visualize", "--random-init", "mae_vit_pico_patch8", "--img-size", "32", "--in-chans", "1",
                 "--data", data, "--out", str(out), "--num", "2"]) == 0 and out.is_file()  # fmt: skip
    run = tmp_path / "run"
    assert main(["pretrain", "--data", data, "--in-chans", "1", "--model", "mae_vit_pico_patch8", "--img-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--no-tensorboard",
                 "--output", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["knn", str(run), "--in-chans", "2", "--data", data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: in_chans (--in-chans) = 2:") and "1 channel(s)" in err and err.count("\n") == 1
    # fine-tuning takes the encoder's channel count and normalization from the run (or its export), as knn does; it
    # used to need --in-chans and stopped with an error about a --mean nobody had given
    ft_common = ["--data", data, "--epochs", "1", "--batch-size", "4", "--mixup", "0", "--cutmix", "0",
                 "--num-workers", "0", "--no-progress", "--no-tensorboard"]  # fmt: skip
    pretrained = torch.load(next(run.glob("checkpoint-*.pt")), map_location="cpu", weights_only=True)["config"]
    assert main(["export", str(run), "--out", str(tmp_path / "enc.safetensors")]) == 0
    for i, source in enumerate((run, tmp_path / "enc.safetensors")):
        rc = main(["finetune", "--pretrained", str(source), *ft_common, "--output", str(tmp_path / f"ft{i}")])
        captured = capsys.readouterr()
        assert rc == 0, captured.err[-2000:]
        tuned = torch.load(next((tmp_path / f"ft{i}").glob("checkpoint-*.pt")), map_location="cpu", weights_only=True)
        assert tuned["config"]["in_chans"] == 1 and tuned["config"]["mean"] == pretrained["mean"]
    rc = main(["finetune", "--pretrained", str(run), "--in-chans", "3", *ft_common, "--output", str(tmp_path / "ft3")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: in_chans (--in-chans) = 3:") and "takes 1 channel(s)" in err
    assert err.count("\n") == 1


def test_a_damaged_tiff_is_one_skip_reason_not_tifffiles_log_lines(tmp_path, caplog):
    """tifffile logs its own warning for a TIFF whose first page points past the end (once per read: every epoch,
    and while measuring mean/std); the reason now goes into the skip line, and tifffile logs as before elsewhere."""
    import logging

    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(BadImage, match=r"no image data \(tifffile: .*invalid offset to first page"):
            load_array(tmp_path / "bad.tif", in_chans=13)
        assert not [r for r in caplog.records if r.name == "tifffile"]
        with tifffile.TiffFile(tmp_path / "bad.tif"):  # another use of tifffile, outside mimkit's reads
            pass
        assert [r for r in caplog.records if r.name == "tifffile"]


def test_band_stacks_are_not_read_as_rgb(tmp_path, capsys, caplog):
    """With --in-chans 3 (the default) a TIFF of 13 bands was read by Pillow as its first page, a grey image, when
    its bands were pages (a silent run on band 0 alone), or not at all ("cannot identify image file") when they were
    samples: every layout now names --in-chans 13; RGB, RGBA and grey TIFFs still read as RGB."""
    import io

    from mimkit.cli import main
    from mimkit.data.decode import load_rgb

    rng = np.random.default_rng(0)
    bands = (rng.random((13, 40, 48)) * 60000).astype(np.uint16)
    layouts = {
        "pages": dict(data=bands, photometric="minisblack"),
        "planar": dict(data=bands, photometric="minisblack", planarconfig="separate"),
        "contig": dict(data=np.moveaxis(bands, 0, -1), photometric="minisblack", planarconfig="contig"),
        "written as is": dict(data=np.moveaxis(bands, 0, -1)),
        "4 bands": dict(data=np.moveaxis(bands[:4], 0, -1), photometric="minisblack", planarconfig="contig"),
    }
    for name, kw in layouts.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", **kw)
        n = 4 if name == "4 bands" else 13
        for src in (tmp_path / f"{name}.tif", io.BytesIO((tmp_path / f"{name}.tif").read_bytes())):  # file, shard
            with caplog.at_level("WARNING"), pytest.raises(BadImage, match=f"has {n} channel.*give --in-chans {n} "):
                load_rgb(src)
            assert not caplog.records, [r.getMessage() for r in caplog.records]  # Pillow's own error line too
        assert load_array(tmp_path / f"{name}.tif", in_chans=n).shape == (n, 40, 48)
    rgb = np.moveaxis(bands[:3], 0, -1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    tifffile.imwrite(
        tmp_path / "rgba.tif", np.moveaxis(bands[:4], 0, -1), photometric="rgb", extrasamples=["unassalpha"]
    )
    tifffile.imwrite(tmp_path / "grey.tif", bands[0])
    tifffile.imwrite(tmp_path / "planar-rgb.tif", bands[:3], photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "frames.tif", np.stack([rgb, rgb]), photometric="rgb")  # read as its first frame
    for name in ("rgb16", "rgba", "grey", "planar-rgb", "frames"):
        im = load_rgb(tmp_path / f"{name}.tif")
        assert im.mode == "RGB" and im.size == (48, 40)
    # a folder of band stacks without --in-chans: one line that names the fix, exit code 2
    (tmp_path / "stack").mkdir()
    for i in range(4):
        tifffile.imwrite(tmp_path / "stack" / f"{i}.tif", bands, photometric="minisblack")
    rc = main(["pretrain", "--data", str(tmp_path / "stack"), "--model", "mae_vit_pico_patch8", "--img-size", "32",
               "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--no-tensorboard",
               "--output", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "give --in-chans 13" in last and "Traceback" not in err
