"""WebDataset shards: the same images as the folder they were packed from, no sample twice in an epoch across
2 ranks x 2 workers, damaged members skipped and counted, an exact mid-epoch resume, and pretraining from the CLI."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mimkit.cli import main
from mimkit.data import collate, find_images
from mimkit.data.pack import pack_shards
from mimkit.data.shards import ShardDataset, assign_slots, find_shards, is_shard_source

from conftest import cli_pretrain


@pytest.fixture(scope="module")
def packed(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    index = pack_shards(str(tiny_folder), str(out), shard_size=5, progress=False)
    return out, index


def _plain():
    return T.Compose([T.Resize((16, 16)), T.ToTensor()])


def _epoch(ds, rank, world, workers, batch, epoch=0, skip=0):
    ds.plan(rank, world, workers, batch)
    ds.set_epoch(epoch, skip)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate, drop_last=True)
    return [b for b in loader]


def test_pack_writes_counts_and_the_shards_hold_the_folders_images(tiny_folder, packed):
    out, index = packed
    assert index["total"] == 24 and [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    shards = find_shards(str(out))
    assert shards.counts == [5, 5, 5, 5, 4] and is_shard_source(str(out))
    to_tensor = _plain()
    from_folder = sorted(to_tensor(Image.open(p).convert("RGB")).sum().item() for p in find_images(tiny_folder).paths)
    ds = ShardDataset(shards, to_tensor, seed=0, shuffle_buffer=3)
    batches = _epoch(ds, 0, 1, 1, 4)
    from_shards = sorted(x.sum().item() for b in batches for x in b["image"])
    assert len(from_shards) == 24 and from_shards == pytest.approx(from_folder)


def test_brace_pattern_and_single_file_sources(packed):
    out, _ = packed
    pattern = str(out / "shard-{000000..000002}.tar")
    assert is_shard_source(pattern) and find_shards(pattern).counts == [5, 5, 5]
    assert find_shards(str(out / "shard-000004.tar")).counts == [4]


def test_pipe_sources_read_through_a_command_with_the_index(packed):
    out, _ = packed
    source = f"pipe:cat {out}/shard-{{000000..000001}}.tar"
    shards = find_shards(source, str(out / "mimkit-shards.json"))
    assert shards.counts == [5, 5]
    ds = ShardDataset(shards, _plain(), seed=0, shuffle_buffer=2)
    assert sum(len(b["image"]) for b in _epoch(ds, 0, 1, 1, 5)) == 10
    with pytest.raises(Exception, match="--shard-index"):
        find_shards(source)


def test_two_ranks_two_workers_never_see_a_sample_twice(packed):
    out, _ = packed
    shards = find_shards(str(out))
    seen = []
    for rank in (0, 1):
        ds = ShardDataset(shards, _plain(), seed=1, shuffle_buffer=4)
        batches = _epoch(ds, rank, 2, 2, 2)
        assert len(batches) == ds.batches  # every rank runs the same number of batches
        seen += [int(i) for b in batches for i in b["index"]]
    assert len(seen) == len(set(seen)) >= 16  # 24 samples, 4 slots, batch 2: at most the remainders are dropped


def test_epochs_reshuffle_and_resume_mid_epoch_is_exact(packed):
    out, _ = packed
    shards = find_shards(str(out))
    ds = ShardDataset(shards, T.Compose([T.RandomResizedCrop(16), T.ToTensor()]), seed=3, shuffle_buffer=4)
    full = _epoch(ds, 0, 1, 2, 3, epoch=1)
    again = _epoch(ds, 0, 1, 2, 3, epoch=1)
    other = _epoch(ds, 0, 1, 2, 3, epoch=2)
    order = [int(i) for b in full for i in b["index"]]
    assert order == [int(i) for b in again for i in b["index"]]  # an epoch is a pure function of its seeds
    assert order != [int(i) for b in other for i in b["index"]]  # the next epoch is reshuffled
    for skip in (1, 3, 4):
        rest = _epoch(ds, 0, 1, 2, 3, epoch=1, skip=skip)
        assert len(rest) == len(full) - skip
        for a, b in zip(full[skip:], rest):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_damaged_members_are_skipped_counted_and_the_plan_still_holds(packed, tmp_path):
    out, _ = packed
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for i, payload in enumerate([b"not an image", None, b"\xff\xd8 truncated"]):
            buf = io.BytesIO()
            if payload is None:
                Image.new("RGB", (20, 20), "blue").save(buf, "PNG")
                payload, ext = buf.getvalue(), "png"
            else:
                ext = "jpg"
            info = tarfile.TarInfo(f"{i:03d}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shards = find_shards(str(bad))
    assert shards.counts == [3]
    ds = ShardDataset(shards, _plain(), seed=0, shuffle_buffer=1)
    batches = _epoch(ds, 0, 1, 1, 3)
    assert len(batches) == 1 and batches[0]["image"].shape == (3, 3, 16, 16)  # topped up from the readable one
    skipped = [p for b in batches for p, _ in b["skipped"]]
    assert len(skipped) >= 2 and all("bad.tar" in p for p in skipped)


def test_assign_slots_balances_counts():
    bins = assign_slots([10, 9, 8, 1, 1, 1], 3)
    loads = sorted(sum([10, 9, 8, 1, 1, 1][i] for i in b) for b in bins)
    assert loads == [10, 10, 10] and sorted(i for b in bins for i in b) == list(range(6))


def test_cli_packs_and_pretrains_from_shards_with_workers(tiny_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", "--data", str(tiny_folder), "--out", str(out), "--shard-size", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 24
    extra = ["--img-size", "32", "--num-workers", "2", "--no-tensorboard"]
    summary = cli_pretrain(out, tmp_path / "run", "mae_vit_pico_patch8", *extra, epochs=2)
    assert summary["steps"] == 12 and summary["epochs_done"] == 2  # 6 shards of 4 over 2 workers: 6 batches
    capsys.readouterr()
    cli_pretrain(out, tmp_path / "run2", "mae_vit_pico_patch8", *extra, "--compute-mean-std", "--max-steps", "1")
    assert "dataset mean" in capsys.readouterr().err


def test_resume_from_shards_with_workers_matches_an_uninterrupted_run(packed, tmp_path):
    from mimkit.engine.checkpoint import list_checkpoints, load_checkpoint
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    out, _ = packed
    common = dict(epochs=3, num_workers=2, save_every_minutes=1e9, shuffle_buffer=4)
    total = pretrain(pico_config(out, tmp_path / "full", **common))["steps"]
    assert total == 15  # shards of 5, 5, 5, 5, 4 on two workers (15 and 9 samples): 3 + 2 batches per epoch
    assert pretrain(pico_config(out, tmp_path / "split", max_steps=7, **common))["steps"] == 7  # mid-epoch 2
    assert pretrain(pico_config(out, tmp_path / "split", resume="auto", **common))["train_steps_this_run"] == 8
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert a["step"] == b["step"] == total
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_visualize_reads_tar_shards(packed, tmp_path, capsys):
    """`mimkit visualize --data SHARDS` (it read folders and file lists only: 'no images found')."""
    out = tmp_path / "v.png"
    rc = main(["visualize", "--random-init", "mae_vit_pico_patch8", "--img-size", "32", "--data", str(packed[0]),
               "--num", "4", "--out", str(out)])  # fmt: skip
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert Image.open(out).size[1] > 4 * 32  # four rows of images
