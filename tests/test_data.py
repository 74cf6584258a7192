import os

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (
    BadImage,
    DataError,
    ImageDataset,
    collate,
    compute_mean_std,
    find_images,
    labelled_splits,
    load_rgb,
    pretrain_transform,
)


def _write_kinds(d):
    """One file per image kind a user's folder may contain; returns {name: (path, readable)}."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    files = {}
    Image.fromarray(rgb).save(d / "rgb.jpg")
    files["rgb"] = (d / "rgb.jpg", True)
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    files["gray"] = (d / "gray.png", True)
    Image.fromarray(np.dstack([rgb, np.full((40, 50), 128, np.uint8)])).save(d / "rgba.png")
    files["rgba"] = (d / "rgba.png", True)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    files["cmyk"] = (d / "cmyk.jpg", True)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    files["palette"] = (d / "palette.png", True)
    Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)).save(d / "gray16.png")
    files["gray16"] = (d / "gray16.png", True)
    Image.fromarray(rng.random((40, 50)).astype(np.float32), mode="F").save(d / "float.tif")
    files["float"] = (d / "float.tif", True)
    (d / "rgb.jpg").read_bytes()
    full = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    files["truncated"] = (d / "truncated.jpg", False)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    files["corrupt"] = (d / "corrupt.png", False)
    (d / "empty.jpg").write_bytes(b"")
    files["empty"] = (d / "empty.jpg", False)
    Image.fromarray(rgb[:3, :3]).save(d / "tiny.png")
    files["tiny"] = (d / "tiny.png", False)
    return files


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return _write_kinds(tmp_path_factory.mktemp("kinds") / "imgs")


@pytest.mark.parametrize(
    "name", ["rgb", "gray", "rgba", "cmyk", "palette", "gray16", "float", "truncated", "corrupt", "empty", "tiny"]
)
def test_each_image_kind(kinds, name):
    path, readable = kinds[name]
    if readable:
        im = load_rgb(str(path), min_size=8)
        assert im.mode == "RGB" and im.size == (50, 40)
        arr = np.asarray(im)
        assert arr.dtype == np.uint8 and arr.std() > 0  # converted content, not a blank image
    else:
        with pytest.raises(BadImage) as err:
            load_rgb(str(path), min_size=8)
        assert str(err.value)


def test_16bit_uses_full_range(kinds):
    arr = np.asarray(load_rgb(str(kinds["gray16"][0])))
    assert arr.max() > 200 and arr.min() < 50


def test_rgba_transparent_pixels_become_neutral_background(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    Image.fromarray(arr).save(tmp_path / "t.png")
    assert tuple(np.asarray(load_rgb(str(tmp_path / "t.png")))[0, 0]) == (124, 116, 104)


def test_dataset_skips_counts_and_names_bad_files(kinds):
    images = find_images(kinds["rgb"][0].parent)
    assert len(images) == 11 and images.labels is None
    ds = ImageDataset(images, pretrain_transform(32), min_image_size=8)
    samples = [ds[i] for i in range(len(ds))]
    batch = collate(samples)
    assert batch["image"].shape == (11, 3, 32, 32)  # bad files replaced: batch shape is unchanged
    skipped = {p.split("/")[-1] for p, _ in batch["skipped"]}
    assert skipped == {"truncated.jpg", "corrupt.png", "empty.jpg", "tiny.png"}
    assert all(reason for _, reason in batch["skipped"])


def test_all_bad_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"y")
    ds = ImageDataset(find_images(tmp_path), pretrain_transform(32))
    with pytest.raises(DataError, match="could not be read"):
        ds[0]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        find_images(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="Accepted extensions"):
        find_images(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        find_images(tmp_path / "nope")


def test_unlabelled_tree_recursive_and_extensions(tmp_path):
    for rel in ["a/b/c/x.JPG", "a/y.webp", "z.bmp", "q.tiff", "r.jpeg", ".hidden/h.png", "a/readme.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in (".txt",):
            p.write_text("x")
        else:
            fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tiff": "TIFF", ".png": "PNG"}
            Image.new("RGB", (20, 20), "red").save(p, fmt[p.suffix.lower()])
    images = find_images(tmp_path)
    names = sorted(p.split("/")[-1] for p in images.paths)
    assert names == ["q.tiff", "r.jpeg", "x.JPG", "y.webp", "z.bmp"]


def test_file_list_relative_and_absolute(tmp_path, tiny_folder):
    some = find_images(tiny_folder).paths[:3]
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "rel.png")
    (tmp_path / "list.txt").write_text("# my images\n" + "\n".join(some) + "\n\nimgs/rel.png\n")
    images = find_images(tmp_path / "list.txt")
    assert len(images) == 4 and images.paths[-1] == str(tmp_path / "imgs" / "rel.png")


def test_labelled_root_and_held_out_split(tiny_folder, tmp_path):
    train = find_images(tiny_folder)
    assert train.classes == ["blue", "red"] and len(train) == 24 and set(train.labels) == {0, 1}
    tr, va = labelled_splits(tiny_folder)
    assert len(va) == 8 and va.classes == tr.classes
    import shutil

    shutil.copytree(tiny_folder / "train", tmp_path / "root" / "train")
    tr2, va2 = labelled_splits(tmp_path / "root")  # no val/: a seeded 20% per class is held out
    assert len(tr2) + len(va2) == 24 and not set(tr2.paths) & set(va2.paths) and len(va2) > 0
    with pytest.raises(DataError, match="needs labels"):
        labelled_splits(tiny_folder / "train" / "red")


def test_compute_mean_std(tiny_folder):
    mean, std = compute_mean_std(find_images(tiny_folder).paths)
    assert len(mean) == 3 and all(0 < s < 1 for s in std)
    # red images dominate channel 0 in half the data, blue channel 2 in the other half: green is darkest
    assert mean[1] < mean[0] and mean[1] < mean[2]


def test_pretrain_transform_output(tiny_folder):
    img = load_rgb(find_images(tiny_folder).paths[0])
    x = pretrain_transform(48)(img)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32


def test_a_failing_transform_is_skipped_and_reported(tiny_folder):
    calls = {"n": 0}

    def flaky(img):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("augmentation bug")
        return pretrain_transform(16)(img)

    ds = ImageDataset(find_images(tiny_folder), flaky)
    sample = ds[0]
    assert sample["image"].shape == (3, 16, 16)
    assert "transform failed: ValueError: augmentation bug" in sample["skipped"][0][1]


def test_randaugment_posterize_zero_bits_is_a_black_image():
    import timm.data.auto_augment as aa
    from PIL import Image

    import mimkit  # noqa: F401  (applies the patch)

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert aa.NAME_TO_OP["PosterizeIncreasing"](img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert aa.NAME_TO_OP["Posterize"](img, 4).getpixel((0, 0)) == (192, 96, 48)


def test_symlink_loops_and_duplicate_links_are_walked_once(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), "red").save(root / "a" / f"{i}.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a/loop -> data: a cycle
    (root / "again").symlink_to(root / "a", target_is_directory=True)  # a second way into a/
    (root / "same.png").symlink_to(root / "a" / "0.png")  # a second name for one file
    images = find_images(root)
    assert len(images) == 3 and len({os.path.realpath(p) for p in images.paths}) == 3


def test_unsupported_files_are_counted_by_extension(tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "ok.png")
    for name in ("a.gif", "b.gif", "c.heic", "notes", "d.GIF"):
        (tmp_path / name).write_bytes(b"x")
    images = find_images(tmp_path)
    assert len(images) == 1 and images.ignored == {".gif": 3, ".heic": 1, "": 1}
    (tmp_path / "ok.png").unlink()
    with pytest.raises(DataError, match=r"only other files: 1 without extension, 3 \.gif, 1 \.heic"):
        find_images(tmp_path)


def test_data_pointing_at_an_image_or_a_binary_file_is_a_clear_error(tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="is an image, not a folder or a list of images"):
        find_images(tmp_path / "one.jpg")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="not a text file listing image paths"):
        find_images(tmp_path / "blob.bin")


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    import torch

    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    ds = ImageDataset(find_images(tmp_path), pretrain_transform(16), seed=7)
    first = ds[2]["image"]
    torch.manual_seed(123)  # the caller's global generator does not matter ...
    state = torch.get_rng_state()
    assert torch.equal(ds[2]["image"], first)
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], first)  # a new epoch, a new crop
    ds.seed = 8
    ds.set_epoch(0)
    assert not torch.equal(ds[2]["image"], first)


def test_an_image_above_pillows_pixel_limit_is_a_bad_image_that_says_what_to_do(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from mimkit.data.decode import BadImage, load_array, load_rgb

    PILImage.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is above twice the limit
    for load in (load_rgb, lambda p: load_array(p, in_chans=1)):
        with pytest.raises(BadImage, match="too large: .*Cut it into tiles"):
            load(tmp_path / "big.png")


def test_an_evaluation_over_one_class_is_refused(tmp_path, capsys):
    """A labelled root whose train/ holds one class (unlabelled images in one sub-folder, or the wrong level of a
    tree) gave kNN top-1 100 % whatever the encoder; now a one-line error, for folders and hf: sources alike."""
    import shutil

    import datasets

    from mimkit.cli import main
    from mimkit.data import labelled_splits

    from conftest import make_folder

    root = make_folder(tmp_path / "one", classes=("red",))
    with pytest.raises(DataError, match=r"holds images of 1 class \(red\); an evaluation needs at least 2"):
        labelled_splits(str(root))
    shutil.rmtree(root / "val")  # the held-out split: the same
    with pytest.raises(DataError, match="needs at least 2"):
        labelled_splits(str(root))
    (tmp_path / "pq").mkdir()
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    datasets.Dataset.from_dict({"image": files, "label": ["red"] * len(files)}).to_parquet(
        str(tmp_path / "pq" / "a.parquet")
    )
    with pytest.raises(DataError, match="needs at least 2"):
        labelled_splits(f"hf:{tmp_path / 'pq'}")
    argv = ["knn", "--random-init", "mae_vit_pico_patch8", "--img-size", "32", "--data", str(root)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {root}: its training split holds")
    two = make_folder(tmp_path / "two")
    assert len(labelled_splits(str(two))[0].classes) == 2
