"""``mimkit shards``: pack a folder tree or a file list into WebDataset tar shards with an index of counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from mimkit.data.decode import BadImage, _is_tiff, load_array, load_rgb
from mimkit.data.shards import INDEX_NAME
from mimkit.data.sources import find_images
from mimkit.errors import ConfigError


def _check_image(path: str) -> None:
    """Raise ``BadImage`` unless ``path`` decodes: as RGB, or (TIFF with any number of bands) at full precision."""
    try:
        load_rgb(path, 1)
    except BadImage:
        if not _is_tiff(path):
            raise
        load_array(path, 1, in_chans=None)


def pack_shards(data: str, out: str, shard_size: int = 5000, progress: bool = True) -> dict:
    """Write ``out/shard-NNNNNN.tar`` (``shard_size`` images each, the original encoded bytes, key = running number,
    plus a ``path`` member with the source path) and ``out/mimkit-shards.json`` (per-shard counts, skipped files).
    Every image is decoded once to check it; unreadable ones are skipped and listed. Returns the index."""
    import webdataset as wds

    images = find_images(data)
    dest = Path(out).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.glob("*.tar"))):
        raise ConfigError(f"--out {out}: holds shards already (or is a file); give a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    skipped, written = [], 0
    pattern = str(dest / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=1e15, verbose=0) as sink:
        for path in tqdm(images.paths, desc="packing", unit="img", disable=not progress):
            try:
                _check_image(path)
            except BadImage as err:
                skipped.append([path, str(err)])
                continue
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            sink.write({"__key__": f"{written:09d}", ext: Path(path).read_bytes(), "path": path.encode()})
            written += 1
    n_shards = (written + shard_size - 1) // shard_size
    shards = [
        {"name": f"shard-{k:06d}.tar", "count": min(shard_size, written - k * shard_size)} for k in range(n_shards)
    ]
    index = {
        "format": "mimkit-shards/1",
        "source": str(data),
        "total": written,
        "shard_size": shard_size,
        "shards": shards,
        "skipped": skipped,
        "ignored_by_extension": images.ignored,
    }
    tmp = dest / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(dest / INDEX_NAME)
    return index
