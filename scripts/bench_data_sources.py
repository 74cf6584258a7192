"""Loader throughput of one image collection in every source format, side by side (docs/benchmarks.md).

Makes, under --work, a file list, WebDataset shards (`mimkit shards`) and a Parquet dataset of the images of --data,
then runs `mimkit bench-data` on folder, list, shards, Parquet (map-style) and Parquet (streaming) in alternating
rounds, and prints per source and worker count the median and range of images/s over the rounds.

    python scripts/bench_data_sources.py --data ../shared/data/caltech101 --work /tmp/bench-data --rounds 3 \
        --out docs/benchmarks/data_sources.json
    python scripts/bench_data_sources.py --render docs/benchmarks/data_sources.json   # the table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def prepare(data: str, work: Path) -> dict[str, list[str]]:
    from mimkit.data import find_images
    from mimkit.data.pack import pack_shards

    work.mkdir(parents=True, exist_ok=True)
    paths = [os.path.abspath(p) for p in find_images(data).paths]
    listing = work / "images.txt"
    if not listing.exists():
        listing.write_text("\n".join(paths) + "\n")
    shards = work / "shards"
    if not (shards / "mimkit-shards.json").exists():
        pack_shards(data, str(shards), shard_size=1000, progress=False)
    parquet = work / "parquet"
    if not parquet.exists():
        import datasets

        def rows():
            for p in paths:
                yield {"image": {"bytes": Path(p).read_bytes(), "path": Path(p).name}}

        features = datasets.Features({"image": datasets.Image()})
        ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(work / "hf-cache"))
        parquet.mkdir()
        parts = 8
        for k in range(parts):
            ds.shard(parts, k, contiguous=True).to_parquet(str(parquet / f"train-{k:03d}.parquet"))
    return {
        "folder": ["--data", data],
        "file list": ["--data", str(listing)],
        "tar shards": ["--data", str(shards)],
        "parquet": ["--data", f"hf:{parquet}"],
        "parquet streaming": ["--data", f"hf:{parquet}", "--hf-streaming"],
    }


def render(path: Path) -> str:
    """The Markdown table of a result file: per source and worker count, median and range over the rounds."""
    res = json.loads(path.read_text())
    lines = [
        f"{res['date']}, {res['machine']}; {res['images']} images; `mimkit bench-data` options: {res['options']}",
        "",
        "| source | workers | img/s median | range | per worker | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        vals, w = row["images_per_s"], row["workers"]
        med = statistics.median(vals)
        lines.append(
            f"| {row['source']} | {w} | {med:.0f} | {min(vals):.0f}-{max(vals):.0f} | {med / max(1, w):.0f} | "
            f"{len(vals)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", type=Path, help="print a result file as Markdown and stop")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    ap.add_argument("--data")
    ap.add_argument("--work", default="/tmp/mimkit-bench-data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", nargs="+", help="only these (folder, 'file list', 'tar shards', parquet, ...)")
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    if not args.data:
        ap.error("--data is required to measure")
    sources = prepare(args.data, Path(args.work))
    if args.sources:
        unknown = set(args.sources) - set(sources)
        if unknown:
            ap.error(f"--sources: unknown {sorted(unknown)}; known: {sorted(sources)}")
        sources = {k: v for k, v in sources.items() if k in args.sources}
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        order = list(sources.items())
        if r % 2:
            order.reverse()  # alternate the order, so that drift of the machine hits every source alike
        for name, extra in order:
            cmd = [sys.executable, "-m", "mimkit.cli", "bench-data", *extra, "--json", "--img-size",
                   str(args.img_size), "--batch-size", str(args.batch_size), "--batches", str(args.batches),
                   "--workers", *map(str, args.workers)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            for row in json.loads(out)["loader"]:
                results.setdefault((name, row["workers"]), []).append(row["images_per_s"])
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_table import write_result

    from mimkit.data import find_images

    options = (f"--img-size {args.img_size} --batch-size {args.batch_size} --batches {args.batches} "
               f"--workers {' '.join(map(str, args.workers))}, {args.rounds} alternating rounds")  # fmt: skip
    res = {
        "images": len(find_images(args.data)),
        "options": options,
        "rows": [{"source": n, "workers": w, "images_per_s": v} for (n, w), v in results.items()],
    }
    out = args.out or Path(args.work) / "data_sources.json"
    write_result(out, res)
    print(render(out))


if __name__ == "__main__":
    main()
