"""Training-step benchmark: forward + backward + optimizer step on synthetic batches, several models, one process."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import torch

from mimkit.engine.guard import parameter_norm
from mimkit.engine.host_memory import keep_freed_memory, release_freed_memory
from mimkit.engine.optim import build_optimizer
from mimkit.engine.trainer import autocast_context
from mimkit.methods import create_method
from mimkit.models._size import pair, size_text


class _RssPeak:
    """Peak resident memory of this process while active (sampled every 2 ms from /proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (options for that model only) -> (name, options)."""
    from mimkit.config import _parse_kv

    name, _, opts = spec.partition(":")
    return name, dict(_parse_kv(kv) for kv in opts.split(",") if kv)


def forward_flops(model, images: torch.Tensor) -> dict:
    """FLOPs of one forward pass per image in the model's mode (torch's FlopCounterMode, matmuls and convolutions;
    a training forward decodes fewer positions than an evaluation one, ``MIMMethod.decode_masked``), split into the
    encoder (every module under ``encoder``) and the rest (decoder, heads, projections), with parameters alike. Work
    on encoder weights outside an encoder module call counts with the rest: a ViT's kept-patch embedding
    (``ViTInterface.embed_kept``, a functional linear map), a few % of a small ViT's encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    state = torch.get_rng_state()
    with torch.no_grad(), counter:
        model({"image": images, "index": torch.arange(images.shape[0], device=images.device)})
    torch.set_rng_state(state)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    prefix = f"{root}.encoder."
    under = [k for k in counts if k == f"{root}.encoder" or k.startswith(prefix)]
    # the outermost encoder entries (each one includes its submodules); the encoder is often called piecewise
    top = [k for k in under if not any(k != o and k.startswith(o + ".") for o in under)]
    encoder = sum(counts[k] for k in top)
    total = counts.get("Global", 0)
    n = images.shape[0]
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "encoder_gflops": encoder / n / 1e9,
        "decoder_gflops": (total - encoder) / n / 1e9,
        "encoder_params_m": enc_params / 1e6,
        "decoder_params_m": (all_params - enc_params) / 1e6,
    }


def bench_model(
    name: str,
    batch_size: int,
    img_size: int | None,
    steps: int,
    warmup: int,
    precision: str,
    device: torch.device,
    compile: bool = False,
    cpu_autocast: bool = False,
    **model_args,
) -> dict:
    """Peak memory over the first steps (model, gradients, optimizer state, activations), then the mean time of
    ``steps`` training steps after ``warmup`` untimed ones. ``name`` may carry options: ``name:key=value,...``.

    On the CPU (glibc) freed memory is unmapped while the peak is measured, so the resident size follows live memory
    (mimkit/engine/host_memory.py), and kept for reuse while the steps are timed, as the trainer's default
    ``--host-memory keep`` does."""
    gc.collect()
    spec = name
    name, own_args = parse_model_spec(spec)
    kwargs = {**model_args, **own_args}
    checkpointing = bool(kwargs.pop("grad_checkpointing", False))  # a bench option, not a model option
    if img_size is not None:
        kwargs["img_size"] = img_size
    cpu = device.type == "cpu"
    if cpu:
        release_freed_memory()
        meter = _RssPeak().__enter__()
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    try:
        model = create_method(name, **kwargs).to(device)
        if checkpointing:
            model.set_grad_checkpointing(True)
    except Exception:
        if cpu:
            meter.__exit__(None, None, None)
        raise
    size = model.img_size
    opt = build_optimizer(model.param_groups(0.05), 1e-4, model.betas, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    run = torch.compile(model) if compile else model
    height, width = pair(size)
    batch = {"image": torch.randn(batch_size, model.in_chans, height, width, device=device)}

    grad_clip = model.default_grad_clip or float("inf")

    def train_step():
        """The trainer's step (mimkit/engine/trainer.py) without its host reads: loss scaling, the gradient norm (and
        clipping where the method clips), the method's hooks around the update (CoMA's frozen model) and the
        parameter norm the divergence guard checks after it."""
        with autocast_context(precision, device, cpu_autocast):
            loss, _ = run(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        model.before_optimizer_step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        parameter_norm(model.parameters())
        return loss

    flops = forward_flops(model, batch["image"][:2])
    for _ in range(2):
        train_step()
    if cpu:
        meter.__exit__(None, None, None)
        peak, mem_kind = meter.growth, "cpu_peak_rss_growth"
        keep_freed_memory()
    else:
        torch.cuda.synchronize(device)
        peak, mem_kind = torch.cuda.max_memory_allocated(device) - base_mem, "cuda_peak_allocated"
    for _ in range(warmup):
        train_step()
    if not cpu:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step()
    last_loss = loss.item()
    if not cpu:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    result = {
        "model": spec,
        "img_size": size,
        "batch_size": batch_size,
        "precision": precision,
        "device": str(device),
        "steps": steps,
        "step_time_s": elapsed / steps,
        "images_per_s": batch_size * steps / elapsed,
        "peak_memory_mb": peak / 2**20,
        "memory_kind": mem_kind,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "grad_checkpointing": checkpointing,
        "loss": last_loss,
        **flops,
    }
    return result


def bench(
    models: list[str],
    batch_size: int,
    img_sizes: list[int | None],
    steps: int,
    warmup: int,
    precision: str,
    device: str = "auto",
    compile: bool = False,
    model_args: dict | None = None,
    cpu_autocast: bool = False,
    rounds: int = 1,
) -> list[dict]:
    """Benchmark every model at every size (``bench_model``), ``rounds`` times with the model order reversed every
    other round; one result dict per model and size: the median round's figures, and the speed ratio to the first
    model as the median of the per-round ratios with their range (``speed_vs_first_range``)."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    results = []
    for size in img_sizes:  # ratios against the first model of the same requested resolution
        runs: dict[int, list[dict]] = {i: [] for i in range(len(models))}
        for rnd in range(rounds):
            order = list(range(len(models)))
            for i in order if rnd % 2 == 0 else order[::-1]:
                runs[i].append(
                    bench_model(
                        models[i], batch_size, size, steps, warmup, precision, dev, compile, cpu_autocast,
                        **(model_args or {}),
                    )
                )  # fmt: skip
        first_mem = statistics.median(x["peak_memory_mb"] for x in runs[0])
        for i in range(len(models)):
            ratios = [runs[i][k]["images_per_s"] / runs[0][k]["images_per_s"] for k in range(rounds)]
            r = dict(sorted(runs[i], key=lambda x: x["step_time_s"])[(rounds - 1) // 2])  # the median round
            r["peak_memory_mb"] = statistics.median(x["peak_memory_mb"] for x in runs[i])
            r["rounds"] = rounds
            r["speed_vs_first"] = statistics.median(ratios)
            r["speed_vs_first_range"] = [min(ratios), max(ratios)]
            r["memory_vs_first"] = r["peak_memory_mb"] / first_mem if first_mem > 0 else None
            results.append(r)
    return results


def format_table(results: list[dict]) -> str:
    """The results as a Markdown table with ratios to the first model."""
    head = (
        f"{'model':44s} {'px':>7s} {'batch':>5s} {'img/s':>9s} {'ms/step':>9s} {'peak MB':>9s} {'speed x':>8s} "
        f"{'mem x':>7s} {'enc GF':>7s} {'dec GF':>7s} {'enc M':>6s} {'dec M':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        mem_x = f"{r['memory_vs_first']:.2f}" if r["memory_vs_first"] is not None else "-"
        lo, hi = r.get("speed_vs_first_range", (r["speed_vs_first"],) * 2)
        size = size_text(r["img_size"]).removesuffix(" px")
        lines.append(
            f"{r['model']:44s} {size:>7s} {r['batch_size']:>5d} {r['images_per_s']:>9.1f} "
            f"{r['step_time_s'] * 1e3:>9.1f} {r['peak_memory_mb']:>9.1f} {r['speed_vs_first']:>8.2f} "
            f"{mem_x:>7s} {r['encoder_gflops']:>7.2f} {r['decoder_gflops']:>7.2f} {r['encoder_params_m']:>6.1f} "
            f"{r['decoder_params_m']:>6.1f}" + (f"  speed x range {lo:.2f}-{hi:.2f}" if r.get("rounds", 1) > 1 else "")
        )
    r0 = results[0]
    rounds = r0.get("rounds", 1)
    lines.append(
        f"device {r0['device']}, {r0['precision']}, memory = {r0['memory_kind']}; ratios are relative to "
        f"the first model at the same resolution (speed x > 1: faster; mem x < 1: less memory); GF = GFLOPs of "
        f"one training forward per image (encoder / the rest), M = million parameters"
        + (
            f"; {rounds} alternating rounds: figures of the median round, speed x the median of the per-round ratios"
            if rounds > 1
            else ""
        )
    )
    return "\n".join(lines)


def bench_data(cfg, workers: list[int], batches: int, warmup: int = 2) -> list[dict]:
    """Decoded + augmented images per second from ``cfg.data`` through the training dataset and loader (the same
    code as pretraining: decoding, skip-and-count, augmentation, collation), for each number of loader ``workers``.
    The first ``warmup`` batches (worker start-up, file-system cache) are timed apart."""
    from mimkit.engine.data import epoch_data
    from mimkit.pretraining import pretrain_dataset, source_images

    images = source_images(cfg.data, cfg.image_column, cfg.shard_index, cfg.hf_streaming)
    rows = []
    for n in workers:
        dataset = pretrain_dataset(cfg, images)
        data = epoch_data(dataset, cfg.batch_size, n, 0, 1, cfg.seed)
        if data.batches_per_epoch() < warmup + batches:
            from mimkit.errors import ConfigError

            raise ConfigError(
                f"--batches {batches}: {cfg.data} gives {data.batches_per_epoch()} batches of {cfg.batch_size} with "
                f"{n} worker(s), fewer than {warmup} warm-up + {batches} timed; lower --batches or --batch-size"
            )
        start = time.perf_counter()
        it = iter(data.loader(0, 0, torch.device("cpu")))
        skipped = sum(len(next(it)["skipped"]) for _ in range(warmup))
        first = time.perf_counter()
        got = 0
        for _ in range(batches):
            batch = next(it)
            got += len(batch["image"])
            skipped += len(batch["skipped"])
        end = time.perf_counter()
        del it
        timed = end - first
        rows.append(
            {
                "source": cfg.data,
                "workers": n,
                "batch_size": cfg.batch_size,
                "img_size": cfg.img_size,
                "images": got,
                "startup_s": round(first - start, 2),
                "images_per_s": round(got / timed, 1) if timed > 0 and got else 0.0,
                "per_worker": round(got / timed / max(1, n), 1) if timed > 0 and got else 0.0,
                "skipped": skipped,
            }
        )
    return rows


def format_data_table(rows: list[dict], model_rate: dict | None = None) -> str:
    """Data-source throughput rows as a Markdown table (and whether the loader keeps up with a model)."""
    lines = [f"{'source':40s} {'workers':>7s} {'img/s':>8s} {'per worker':>10s} {'start-up s':>10s} {'skipped':>7s}"]
    for r in rows:
        lines.append(
            f"{r['source'][-40:]:40s} {r['workers']:7d} {r['images_per_s']:8.1f} {r['per_worker']:10.1f} "
            f"{r['startup_s']:10.2f} {r['skipped']:7d}"
        )
    if model_rate:
        best = max(r["images_per_s"] for r in rows)
        verdict = "keeps up" if best >= model_rate["images_per_s"] else "is the bottleneck"
        lines.append(
            f"model {model_rate['model']} at {model_rate['img_size']} px on {model_rate['device']}: "
            f"{model_rate['images_per_s']:.1f} img/s per process; the loader at its best ({best:.1f} img/s) {verdict}"
        )
    return "\n".join(lines)
