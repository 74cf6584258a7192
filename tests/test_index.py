"""The shared image index: paths in a flat array, cached in the run folder, reused until a folder changes."""

import random
import time

import pytest
from PIL import Image

from mimkit.data import find_images
from mimkit.data.index import INDEX_FILE, indexed_images
from mimkit.data.patharray import PathArray


def test_path_array_behaves_like_a_list_of_strings():
    names = ["a/b.jpg", "ü/ç é.png", "", "x" * 300]
    arr = PathArray(names)
    assert len(arr) == 4 and list(arr) == names and arr[1] == names[1] and arr[-1] == names[-1]
    assert arr[1:3] == names[1:3] and arr[::2] == names[::2] and "a/b.jpg" in arr
    assert sorted(random.Random(0).sample(arr, 2)) == sorted(random.Random(0).sample(names, 2))


def test_index_is_cached_reused_and_refreshed_when_a_folder_changes(tiny_folder, tmp_path, monkeypatch):
    data = tmp_path / "images"
    for sub in ("a", "b"):
        (data / sub).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), "red").save(data / sub / f"{i}.png")
    out = tmp_path / "run"
    out.mkdir()
    first = indexed_images(str(data), out)
    assert len(first) == 6 and (out / INDEX_FILE).is_file()
    assert list(first.paths) == list(find_images(data).paths)

    import mimkit.data.index as index

    def no_scan(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(index, "find_images", no_scan)
    again = indexed_images(str(data), out)
    assert list(again.paths) == list(first.paths)  # read back, not rescanned
    monkeypatch.undo()

    time.sleep(0.01)
    Image.new("RGB", (20, 20), "red").save(data / "b" / "new.png")  # changes folder b's modification time
    assert len(indexed_images(str(data), out)) == 7


def test_labelled_roots_keep_their_labels_through_the_cache(tiny_folder, tmp_path):
    first = indexed_images(str(tiny_folder), tmp_path)
    second = indexed_images(str(tiny_folder), tmp_path)
    assert second.classes == first.classes == ["blue", "red"]
    assert list(second.labels) == list(first.labels) and len(second) == 24


@pytest.mark.parametrize("kind", ["list", "PathArray"])
def test_paths_survive_pickling_for_spawned_workers(kind):
    import pickle

    names = [f"/data/{i}.jpg" for i in range(10)]
    arr = names if kind == "list" else PathArray(names)
    assert list(pickle.loads(pickle.dumps(arr))) == names
