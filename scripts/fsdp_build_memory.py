"""Host memory of building a model for FSDP, per rank: every rank builds the full model and shards it, against
rank 0 alone building it while every rank shards a meta-device twin (mimkit/engine/fsdp.py, ``materialise_shards``).

Starts --ranks CPU processes (gloo) per way, alternating over --rounds, and records each rank's peak RSS growth over
the build (``ru_maxrss`` minus the RSS before it), in MB, with the parameter count:

    .venv/bin/python scripts/fsdp_build_memory.py --model mae_vit_large_patch16 --rounds 3 \
        --out docs/benchmarks/fsdp_build_memory.json
    .venv/bin/python scripts/fsdp_build_memory.py --render docs/benchmarks/fsdp_build_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_table import add_result_args, write_result  # noqa: E402

WAYS = ("full on every rank", "meta twin, rank 0 builds")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(model_name: str, way: str, out: str) -> None:
    """One rank: build the way asked, shard, materialise; write {rank, peak_mb, params} to ``out``.rank."""
    import torch
    import torch.distributed as dist

    import mimkit  # noqa: F401
    from mimkit.engine.fsdp import materialise_shards, shard_model
    from mimkit.methods import create_method

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    before = _rss_mb()
    if way == WAYS[0]:
        model = create_method(model_name)
        shard_model(model)
    else:
        full = create_method(model_name) if rank == 0 else None
        with torch.device("meta"):
            model = create_method(model_name)
        shard_model(model)
        materialise_shards(model, full, torch.device("cpu"))
        del full
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    params = sum(p.numel() for p in model.parameters())  # sharded: the global count
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "peak_mb": peak, "params": params}))
    dist.destroy_process_group()


def measure(model: str, ranks: int, rounds: int) -> dict:
    import tempfile

    results: dict[str, list[list[float]]] = {w: [] for w in WAYS}
    params = 0
    for r in range(rounds):
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rank")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                       __file__, "--worker", model, way, out]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                rows = [json.loads(Path(f"{out}.{k}").read_text()) for k in range(ranks)]
            results[way].append([row["peak_mb"] for row in rows])
            params = rows[0]["params"]
            print(f"round {r + 1}: {way}: {[round(row['peak_mb']) for row in rows]} MB", file=sys.stderr, flush=True)
    return {"params": params, "ranks": ranks, "peak_mb": results}


def render(path: Path) -> str:
    res = json.loads(path.read_text())
    lines = [
        f"{res['date']}, {res['machine']}, `{res['model']}` ({res['params'] / 1e6:.0f} M parameters, "
        f"{4 * res['params'] / 2**20:,.0f} MB in fp32), {res['ranks']} ranks, {len(res['peak_mb'][WAYS[0]])} "
        "alternating rounds; peak RSS growth over the build, MB, median (range) over the rounds:",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        "| build | " + " | ".join(f"rank {k}" for k in range(res["ranks"])) + " | all ranks |",
        "|---|" + "---|" * (res["ranks"] + 1),
    ]
    for way in WAYS:
        runs = res["peak_mb"][way]
        cells = []
        for k in range(res["ranks"]):
            vals = [run[k] for run in runs]
            cells.append(f"{statistics.median(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f})")
        total = statistics.median(sum(run) for run in runs)
        lines.append(f"| {way} | " + " | ".join(cells) + f" | {total:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mae_vit_large_patch16")
    ap.add_argument("--ranks", type=int, default=2)
    add_result_args(ap)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return 0
    if a.render:
        print(render(a.render))
        return 0
    res = measure(a.model, a.ranks, a.rounds)
    args = f"--model {a.model} --ranks {a.ranks} --rounds {a.rounds}"
    command = f".venv/bin/python scripts/fsdp_build_memory.py {args} --out {a.out}"
    print(write_result(a.out, {**res, "model": a.model, "command": command}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
