"""The ``mimkit`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
import time
from pathlib import Path

EPILOG = (
    "Run `mimkit COMMAND --help` for the options of a command. Exit codes: 0 done, 2 bad option/file/data, "
    "3 stopped by a signal after saving (rerun to resume), 4 diverged, 5 a checkpoint or another output could not be "
    "written."
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``mimkit CMD: error: ...``) with exit code 2, no usage block."""

    def error(self, message: str):
        """A usage error: one line naming the problem and `--help`, exit code 2 (no usage dump)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or float within [low, high] (or open bounds); the error states the range."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (
            value != value
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        ):
            parts = []
            if low is not None:
                parts.append(f"{'>' if low_open else '>='} {low}")
            if high is not None:
                parts.append(f"{'<' if high_open else '<='} {high}")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {' and '.join(parts)}")
        return value

    convert.__name__ = kind.__name__
    convert.bounds = dict(kind=kind, low=low, high=high, low_open=low_open, high_open=high_open)  # for tests/docs
    return convert


POS_INT = _number(int, 1)
NONNEG_INT = _number(int, 0)
POS_FLOAT = _number(float, 0, low_open=True)


def _device(name: str):
    import torch

    from mimkit.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
    return dev


# An OSError with one of these is reported in one line with exit code 5 (an output could not be written).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)

# Figures are written by Pillow, which takes the format from the suffix.
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".pdf")


def _out_file(path: str, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output file path: not a folder or a device, named with one of ``suffixes`` (its format) where given; its
    folder is created."""
    from mimkit.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{option} {path}: exists and is not a regular file (a device or pipe); give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        others = f" (or {', '.join(suffixes[1:])})" if len(suffixes) > 1 else ""
        raise ConfigError(f"{option} {path}: give a file name ending in {suffixes[0]}{others}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {path}: its folder cannot be created ({err.strerror})") from None
    return p


def _out_dir(path: str, option: str) -> Path:
    """An output folder path: not an existing file."""
    from mimkit.errors import ConfigError

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder; give a folder for the outputs")
    return p


def _check_model_specs(specs: list[str], shared: dict) -> None:
    """Every ``name[:key=value,...]`` of ``mimkit bench --models`` names a model that takes those options."""
    from mimkit.bench import parse_model_spec
    from mimkit.errors import ConfigError
    from mimkit.methods import method_options

    for spec in specs:
        try:
            name, own = parse_model_spec(spec)
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"--models {spec}: {err}") from None
        try:
            accepted = method_options(name)
        except ConfigError as err:
            raise ConfigError(f"--models {spec}: {err}") from None
        for option, given in (("--model-arg", shared), (f"--models {spec}:", own)):
            unknown = [k for k in given if k not in accepted and k not in ("img_size", "grad_checkpointing")]
            if unknown:
                raise ConfigError(
                    f"{option} {', '.join(unknown)}: model '{name}' has no such option "
                    f"(`mimkit models {name}` lists them)"
                )


def _load_model(args, encoder_only: bool = True):
    """(model, img_size, mean, std) from a checkpoint or run folder, from an encoder alone (``encoder_only``: a
    `mimkit export` file, a fine-tuning run, released ViT weights), or a randomly initialized model; the size is
    ``--img-size`` where given (``_evaluation_size``)."""
    from mimkit.errors import ConfigError
    from mimkit.loading import random_init
    from mimkit.models._size import canonical

    if isinstance(args.img_size, list):  # one value or HEIGHT WIDTH, as pretrain takes it
        if len(args.img_size) > 2:
            raise ConfigError(f"img_size (--img-size) = {args.img_size}: give one size (square) or two: HEIGHT WIDTH")
        args.img_size = canonical(args.img_size[0] if len(args.img_size) == 1 else args.img_size)
    if args.checkpoint and args.random_init:
        raise ConfigError("give either a checkpoint or --random-init MODEL, not both")
    if args.checkpoint:
        model, size, mean, std = _load_source(args, encoder_only)
        return *_evaluation_size(args, model, size, encoder_only), mean, std
    if not args.random_init:
        raise ConfigError("give a checkpoint (file or run folder) or --random-init MODEL")
    channels = {"in_chans": args.in_chans} if args.in_chans != 3 else {}
    model = random_init(args.random_init, img_size=args.img_size, seed=args.seed, **channels)
    return model, model.img_size, *_normalization(args, args.in_chans)


def _evaluation_size(args, model, own, encoder_only: bool):
    """(model, size) for evaluating a checkpoint or encoder: at its own size, or at ``--img-size``. A model that
    takes that size as it is (a pyramid whose windows tile the map: tried on one blank image) is kept; one built for
    one size (a ViT's position embedding, LoMaR's bias tables) is rebuilt for it by fine-tuning's rule
    (``eval.features.at_size``); a one-line error otherwise. A figure is drawn at the pretraining size only (its
    decoder's)."""
    import torch

    from mimkit.errors import ConfigError
    from mimkit.eval.features import at_size
    from mimkit.models._size import canonical, pair, size_text

    if not args.img_size or canonical(args.img_size) == canonical(own):
        return model, own
    given = f"img_size (--img-size) = {size_text(args.img_size)}"
    if not encoder_only:
        raise ConfigError(f"{given}: {args.checkpoint} draws its figures at its own {size_text(own)}; leave it out")
    blank = torch.zeros(1, model.in_chans, *pair(args.img_size))
    try:
        with torch.no_grad():
            model.eval().extract_features(blank)
        return model, args.img_size
    except (AssertionError, ValueError, RuntimeError) as err:
        first = err
    try:
        resized = at_size(model, args.img_size)
        with torch.no_grad():
            resized.extract_features(blank)
    except (AssertionError, ValueError, RuntimeError):
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
        raise ConfigError(
            f"{given}: {args.checkpoint} cannot take it ({reason}); leave it out for its own {size_text(own)}"
        ) from None
    return resized, args.img_size


def _load_source(args, encoder_only: bool):
    """(model, its size, mean, std) of the checkpoint, run folder or encoder alone ``args.checkpoint``."""
    from mimkit.errors import ConfigError
    from mimkit.loading import is_encoder_source, load_encoder, load_pretrained

    if is_encoder_source(args.checkpoint):
        if not encoder_only:
            raise ConfigError(
                f"{args.checkpoint}: an encoder without its decoder (an export, a fine-tuning run or released "
                "weights); give the pretraining run or checkpoint, whose decoder draws the reconstructions"
            )
        model, known = load_encoder(args.checkpoint)
        _keeps_channels(args, model.in_chans)
        if "mean" in known:
            return model, model.img_size, known["mean"], known["std"]
        return model, model.img_size, *_normalization(args, model.in_chans)
    model, cfg = load_pretrained(args.checkpoint)
    _keeps_channels(args, cfg.in_chans)
    args._viz_bands = cfg.viz_bands  # the run's display bands, for figures of more than 3 channels
    return model, cfg.img_size, cfg.mean, cfg.std


def _keeps_channels(args, chans: int) -> None:
    """A checkpoint's or encoder's channel count is its own: a different --in-chans is an error."""
    from mimkit.errors import ConfigError

    if args.in_chans != 3 and args.in_chans != chans:
        raise ConfigError(
            f"in_chans (--in-chans) = {args.in_chans}: {args.checkpoint} is a model of {chans} channel(s), "
            "which it keeps; --in-chans sets a --random-init model's"
        )


def _normalization(args, chans: int) -> tuple[list[float], list[float]]:
    """(mean, std) for a model that carries none: ImageNet's for 3 channels, else measured from ``--data`` as
    `mimkit pretrain --in-chans N` does."""
    from mimkit.data import IMAGENET_MEAN, IMAGENET_STD

    if chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    from mimkit.data import compute_mean_std
    from mimkit.pretraining import source_images

    paths = source_images(args.data, getattr(args, "image_column", "")).paths
    mean, std = compute_mean_std(paths, max_images=1000, seed=args.seed, in_chans=chans)
    return list(mean), list(std)


def cmd_pretrain(args):
    """`mimkit pretrain`: build the config from the recipe and flags, then pretrain."""
    from mimkit.config import PretrainConfig, config_from_args
    from mimkit.errors import ConfigError
    from mimkit.pretraining import pretrain

    cfg = config_from_args(args, PretrainConfig)
    if not cfg.data:
        raise ConfigError("data (--data) is required: a folder of images, an ImageFolder root, or a file list")
    _host_huge_pages(args, cfg.host_memory, cfg.host_huge_pages)
    summary = pretrain(cfg)
    print(json.dumps(summary, indent=2))
    return _run_exit_code(summary)


def _host_huge_pages(args, host_memory: str, huge_pages: str) -> None:
    """``--host-huge-pages auto`` with ``--host-memory keep``: start the command again with the C heap in 2 MiB
    pages where that changes something (mimkit/engine/host_memory.py). Only when ``main`` runs as the program (not
    when called with an argument list, as tests do), and before the command has written anything."""
    if getattr(args, "process_entry", False) and host_memory == "keep" and huge_pages == "auto":
        from mimkit.engine.host_memory import restart_with_huge_page_heap

        restart_with_huge_page_heap()


def _run_exit_code(summary: dict) -> int:
    from mimkit.errors import EXIT_OK, EXIT_STOPPED

    return EXIT_STOPPED if summary.get("stopped_by") else EXIT_OK


def cmd_finetune(args):
    """`mimkit finetune`: fine-tune a pretrained (or randomly initialised) encoder as a classifier."""
    from mimkit.config import config_from_args, load_recipe
    from mimkit.errors import ConfigError
    from mimkit.eval.finetune import FinetuneConfig, finetune, source_data

    recipe = load_recipe(args.recipe) if args.recipe else {}
    source = source_data(args.pretrained) if args.pretrained else {}
    if args.in_chans is None and "in_chans" not in recipe and "in_chans" in source:
        args.in_chans = source["in_chans"]  # the encoder's own channel count, as knn and linprobe take it
    chans = args.in_chans if args.in_chans is not None else recipe.get("in_chans", 3)
    norm_keys = ("mean", "std", "compute_mean_std")
    given = any(getattr(args, k, None) is not None for k in norm_keys) or any(k in recipe for k in norm_keys)
    if not given and "mean" in source and len(source["mean"]) == chans:  # else a mismatch the task names
        args.mean, args.std = source["mean"], source["std"]  # normalized as in pretraining, unless told otherwise
    cfg = config_from_args(args, FinetuneConfig)
    if not cfg.data:
        raise ConfigError("data (--data) is required: an ImageFolder root with train/<class>/ and val/<class>/")
    _host_huge_pages(args, cfg.host_memory, cfg.host_huge_pages)
    summary = finetune(cfg)
    print(json.dumps(summary, indent=2))
    return _run_exit_code(summary)


def cmd_knn(args):
    """`mimkit knn`: weighted kNN top-1/top-5 of a checkpoint's (or random-init) features."""
    from mimkit.eval import knn_evaluate
    from mimkit.models._size import size_text

    device = _device(args.device)
    columns = _columns(args)
    model, img_size, mean, std = _load_model(args)
    res = knn_evaluate(
        model,
        args.data,
        img_size,
        mean,
        std,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        pool=args.pool,
        progress=True,
        columns=columns,
    )
    res["checkpoint"] = str(args.checkpoint or f"random init: {args.random_init}")
    print(
        json.dumps(res, indent=2)
        if args.json
        else f"kNN (k={res['k']}, T={res['temperature']}) top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
        f"({res['n_train']} train / {res['n_val']} val images, {res['classes']} classes, {size_text(img_size)})"
    )
    return res


def cmd_linprobe(args):
    """`mimkit linprobe`: linear probe on frozen features."""
    import torch

    from mimkit.eval import linear_probe

    device = _device(args.device)
    out = _out_dir(args.output, "--output") if args.output else None
    columns = _columns(args)
    model, img_size, mean, std = _load_model(args)
    res = linear_probe(
        model,
        args.data,
        img_size,
        mean,
        std,
        epochs=args.epochs,
        batch_size=args.batch_size,
        blr=args.blr,
        warmup_epochs=args.warmup_epochs,
        cache=not args.no_cache,
        pool=args.pool,
        num_workers=args.num_workers,
        device=device,
        seed=args.seed,
        progress=True,
        columns=columns,
    )
    head = res.pop("head")
    res["checkpoint"] = str(args.checkpoint or f"random init: {args.random_init}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(head, out / "linprobe_head.pt")
        (out / "linprobe.json").write_text(json.dumps(res, indent=2))
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
    else:
        print(
            f"linear probe top-1 {res['top1']:.2f}% (best {res['best_top1']:.2f}% at epoch {res['best_epoch']}), "
            f"top-5 {res['top5']:.2f}% ({res['n_train']} train / {res['n_val']} val, {res['classes']} classes)"
        )
    return res


def cmd_export(args):
    """`mimkit export`: the encoder (of a pretraining run) or the classifier (of a fine-tuning run) as a
    timm-loadable safetensors file with its metadata."""
    from mimkit.errors import ConfigError
    from mimkit.export import data_cfg_overlay, export_classifier, export_encoder, finetune_checkpoint
    from mimkit.loading import load_pretrained

    _out_file(args.out, "--out", (".safetensors",))  # timm reads a file by its suffix
    tuned = finetune_checkpoint(args.checkpoint)
    if tuned is not None:
        if args.head_classes is not None:
            raise ConfigError(
                f"--head-classes {args.head_classes}: {args.checkpoint} is a fine-tuning run, whose trained "
                f"classifier is exported as it is; leave --head-classes out"
            )
        meta = export_classifier(*tuned, args.out)
        classes = len(json.loads(meta.get("classes", "[]"))) or meta["head"]
        score = f", val top-1 {float(meta['val_top1']):.2f}%" if "val_top1" in meta else ""
        print(f"classifier of {tuned[0]} ({classes} classes{score}; class names in the file's metadata)")
    else:
        model, cfg = load_pretrained(args.checkpoint)
        meta = export_encoder(
            model, args.out, head_classes=args.head_classes, source=str(args.checkpoint), mean=cfg.mean, std=cfg.std
        )
    kwargs = json.loads(meta["timm_kwargs"])
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    overlay = {
        k: tuple(round(x, 6) for x in v) if isinstance(v, tuple) else v for k, v in data_cfg_overlay(meta).items()
    }
    data = "".join(f", {k}={v!r}" for k, v in overlay.items())
    head = "; the class count too, so that timm keeps the trained head" if "num_classes" in overlay else ""
    print(
        f"wrote {args.out}\nload it with (input size and normalization of the run in the overlay, for timm's "
        f"resolve_data_config{head}):\n  import mimkit, timm\n  timm.create_model('{meta['timm_model']}', "
        f"pretrained=True, pretrained_cfg_overlay=dict(file='{args.out}', custom_load=False{data}){extra})"
    )


def cmd_visualize(args):
    """`mimkit visualize`: original / masked input / reconstruction grids of a checkpoint."""
    import torch

    from mimkit.data import BadImage, eval_transform, load_image
    from mimkit.errors import ConfigError, DataError
    from mimkit.pretraining import source_images
    from mimkit.viz import save_reconstruction_figure

    _out_file(args.out, "--out", FIGURE_SUFFIXES)
    _columns(args)
    model, img_size, mean, std = _load_model(args, encoder_only=False)
    bands = args.bands or getattr(args, "_viz_bands", None)
    if bands and max(bands) >= model.in_chans:
        raise ConfigError(f"--bands {' '.join(map(str, bands))}: the model takes {model.in_chans} channel(s)")
    split = "val" if Path(args.data, "val").is_dir() else "train"
    files = source_images(args.data, getattr(args, "image_column", ""), split=split).paths
    transform, picked = eval_transform(img_size, mean, std), []
    for f in files[:: max(1, len(files) // args.num)]:  # spread over the source; an unreadable image is passed over
        try:
            picked.append(transform(load_image(f, 1, model.in_chans)))
        except BadImage:
            continue
        if len(picked) == args.num:
            break
    if not picked:
        raise DataError(f"{args.data}: none of the images sampled for the figure could be read")
    batch = torch.stack(picked)
    title = f"{Path(args.checkpoint).name if args.checkpoint else 'random init'}"
    path = save_reconstruction_figure(
        model, batch, mean, std, args.out, stats=args.stats, title=title, seed=args.seed, bands=bands
    )
    print(f"wrote {path}")
    return path


def cmd_mask_frequency(args):
    """`mimkit mask-frequency`: how often CoMA's cycle masks hide each unit, as a figure."""
    from mimkit.viz import save_masking_frequency_figure

    _out_file(args.out, "--out", FIGURE_SUFFIXES)
    stats = save_masking_frequency_figure(args.out, (args.grid, args.grid), args.ratio, args.iterations, args.seed)
    print(json.dumps({"figure": args.out, **stats}, indent=2))


def cmd_bench(args):
    """`mimkit bench`: training-step time, memory and FLOPs of models side by side."""
    from mimkit.bench import bench, format_table
    from mimkit.models.layers import set_cpu_linear

    _device(args.device)
    _check_model_specs(args.models, dict(args.model_arg or []))
    _host_huge_pages(args, "keep", args.host_huge_pages)  # its steps are timed with freed memory kept
    set_cpu_linear(args.cpu_linear)
    results = bench(
        args.models,
        args.batch_size,
        args.img_size or [None],
        args.steps,
        args.warmup,
        args.precision,
        args.device,
        args.compile,
        dict(args.model_arg or []),
        args.cpu_autocast,
        args.rounds,
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return results


def cmd_bench_data(args):
    """`mimkit bench-data`: loader throughput of a data source (and optionally a model's step rate)."""
    from mimkit.bench import bench_data, bench_model, format_data_table
    from mimkit.config import PretrainConfig, config_from_dict

    model_rate = None
    img_size = args.img_size
    dev = _device(args.device)
    if args.model:
        _check_model_specs([args.model], {})
        extra = {"in_chans": args.in_chans} if args.in_chans != 3 else {}
        model_rate = bench_model(args.model, args.batch_size, img_size, args.steps, 2, args.precision, dev, **extra)
        img_size = model_rate["img_size"]
    values = dict(
        data=args.data,
        img_size=img_size or 224,
        batch_size=args.batch_size,
        in_chans=args.in_chans,
        image_column=args.image_column,
        hf_streaming=args.hf_streaming,
        shard_index=args.shard_index,
        seed=0,
    )
    cfg = config_from_dict(PretrainConfig, values, "bench-data")
    rows = bench_data(cfg, args.workers, args.batches, args.warmup)
    if args.json:
        print(json.dumps({"loader": rows, "model": model_rate}, indent=2))
    else:
        print(format_data_table(rows, model_rate))
    return rows, model_rate


def cmd_compare(args):
    """`mimkit compare`: several models or variants at equal budget, seeds, kNN table and plot."""
    from mimkit.compare import run_comparison
    from mimkit.errors import ConfigError

    _out_dir(args.output, "--output")
    from mimkit.data.hf import is_hf_source
    from mimkit.data.sources import is_labelled_root, labelled_splits

    _columns(args)
    eval_columns = _columns(args, "eval-")
    if is_hf_source(args.eval_data):  # its labels and splits, checked before any run (a one-line DataError)
        labelled_splits(args.eval_data, **eval_columns)
    elif not is_labelled_root(Path(args.eval_data).expanduser()):
        raise ConfigError(
            f"--eval-data {args.eval_data}: not a labelled ImageFolder root (train/<class>/...) or hf: dataset"
        )
    _check_model_specs(args.models, {})
    extra = {"num_workers": args.num_workers} if args.num_workers is not None else {}
    if args.in_chans is not None:
        extra["in_chans"] = args.in_chans
    if args.image_column:
        extra["image_column"] = args.image_column
    result = run_comparison(
        args.data,
        args.eval_data,
        args.models,
        args.output,
        args.seeds,
        args.epochs,
        args.minutes,
        args.img_size,
        args.batch_size,
        extra,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
        recipe=args.recipe or "",
        eval_columns=eval_columns,
    )
    print((Path(args.output) / "compare.md").read_text())
    return result


def cmd_shards(args):
    """`mimkit shards`: pack an image folder into tar shards with an index."""
    from mimkit.data.pack import pack_shards

    _out_dir(args.out, "--out")
    index = pack_shards(args.data, args.out, args.shard_size, progress=not args.no_progress)
    print(
        json.dumps(
            {k: v for k, v in index.items() if k != "shards"}
            | {
                "shards": len(index["shards"]),
                "skipped": len(index["skipped"]),
                "index": str(Path(args.out) / "mimkit-shards.json"),
            },
            indent=2,
        )
    )
    if index["skipped"]:
        print(f"skipped {len(index['skipped'])} unreadable file(s), listed in the index", file=sys.stderr)


def cmd_models(args):
    """`mimkit models [NAME]`: the registered models, or one model's options and defaults."""
    from mimkit.methods import list_methods, method_options
    from mimkit.methods.registry import get_preset

    if args.name:
        get_preset(args.name)  # an unknown name is a one-line error with suggestions
    if args.name:
        print(
            f"{args.name}: {get_preset(args.name).doc}\noptions (set with --model-arg KEY=VALUE or in a recipe's "
            "model_args):"
        )
        for key, value in method_options(args.name).items():
            print(f"  {key} = {value!r}")
        return
    for name in list_methods():
        print(f"{name:32s} {get_preset(name).doc}")


def cmd_recipes(args):
    """`mimkit recipes`: the bundled recipes."""
    import yaml

    from mimkit.config import available_recipes, resolve_recipe

    for name in available_recipes():
        desc = (yaml.safe_load(resolve_recipe(name).read_text()) or {}).get("description", "")
        print(f"{name:28s} {desc}")


def cmd_demo(args):
    """`mimkit demo`: pretrain on the bundled sample images, then kNN against random init."""
    from mimkit.config import PretrainConfig, config_from_dict, load_recipe
    from mimkit.pretraining import pretrain

    t0 = time.time()
    here = Path(__file__).resolve().parent
    bundled = here / "sample_images"  # an installed wheel
    if not bundled.is_dir():
        bundled = here.parent / "examples" / "sample_images"  # a checkout (editable install)
    data = Path(args.data) if args.data else bundled
    out = _out_dir(args.output, "--output")
    values = load_recipe("demo_cpu")
    values.update(data=str(data), output=str(out), time_limit_min=args.minutes)
    cfg = config_from_dict(PretrainConfig, values, "demo")
    if args.data:  # the kNN steps need labels: checked before pretraining; a small folder gets a batch that fits
        from mimkit.data import labelled_splits

        n = len(labelled_splits(str(data), seed=0)[0])
        if 2 <= n < cfg.batch_size:
            cfg.batch_size = 1 << (n.bit_length() - 1)
            print(f"[demo] {n} training images: batch size {cfg.batch_size}", flush=True)
    _host_huge_pages(args, cfg.host_memory, cfg.host_huge_pages)
    print(f"[1/4] pretraining {cfg.model} on {data} for up to {args.minutes} min ...", flush=True)
    summary = pretrain(cfg)
    ns = argparse.Namespace(
        checkpoint=str(out),
        random_init=None,
        img_size=None,
        seed=0,
        data=str(data),
        k=20,
        temperature=0.07,
        batch_size=128,
        num_workers=0,
        device="auto",
        pool="avg",
        json=False,
        in_chans=cfg.in_chans,
    )
    print("[2/4] kNN evaluation of the pretrained encoder:", flush=True)
    trained = cmd_knn(ns)
    print("[3/4] kNN evaluation of the same encoder at random init (the baseline):", flush=True)
    ns.checkpoint, ns.random_init, ns.img_size = None, cfg.model, cfg.img_size
    baseline = cmd_knn(ns)
    ns.checkpoint, ns.random_init, ns.num, ns.stats, ns.bands = str(out), None, 8, "target", None
    ns.out = str(out / "reconstruction.png")
    print("[4/4] reconstruction figure:", flush=True)
    fig = cmd_visualize(ns)
    result = {
        "pretrain": summary,
        "knn_top1_pretrained": trained["top1"],
        "knn_top1_random_init": baseline["top1"],
        "figure": str(fig),
        "wall_time_s": round(time.time() - t0, 1),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nDemo finished in {result['wall_time_s']:.0f} s.\n"
        f"  kNN top-1: pretrained {trained['top1']:.1f}% vs random init {baseline['top1']:.1f}%\n"
        f"  checkpoints, config.yaml, metrics.jsonl, train.log: {out}/\n"
        f"  TensorBoard:           tensorboard --logdir {out}/tensorboard\n"
        f"  reconstruction figure: {fig}\n"
        f"  export the encoder:    mimkit export {out} --out {out}/encoder.safetensors"
    )


def cmd_ablate_masking(args):
    """`mimkit ablate-masking`: UM-MAE's masking ablation (uniform, grid, random) at equal budget."""
    from mimkit.ablation import ablation_markdown, run_masking_ablation
    from mimkit.config import load_recipe

    _out_dir(args.output, "--output")
    load_recipe(args.recipe)  # a missing recipe is an error before any work
    rows = run_masking_ablation(args.data, args.output, args.recipe, args.epochs, knn=not args.no_knn, seed=args.seed)
    command = " ".join(["mimkit", *map(shlex.quote, args.argv)])
    table = ablation_markdown(rows, command)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "ablation.md").write_text(table + "\n")
    (Path(args.output) / "ablation.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return rows


def _column_args(p: argparse.ArgumentParser, prefix: str = "", labels: bool = True) -> None:
    """--[PREFIX]image-column and --[PREFIX]label-column: the columns of an hf: dataset (``_columns``)."""
    from mimkit.config import LABEL_COLUMN_HELP

    data = f"--{prefix}data"
    p.add_argument(
        f"--{prefix}image-column",
        default="",
        help=f"hf: {data}: the column holding the images (default: the first of Image type, one named image/img, "
        "or one of image file paths)",
    )
    if labels:
        p.add_argument(
            f"--{prefix}label-column",
            default="",
            help=f"hf: {data}: {LABEL_COLUMN_HELP}",
        )


def _columns(args, prefix: str = "") -> dict:
    """``labelled_splits``' column arguments from ``_column_args``' options; refused unless their data is hf:."""
    from mimkit.data.hf import is_hf_source
    from mimkit.errors import ConfigError

    key = prefix.replace("-", "_")
    data = getattr(args, key + "data")
    columns = {
        "image_column": getattr(args, key + "image_column", ""),
        "label_column": getattr(args, key + "label_column", ""),
    }
    flags = (f"--{prefix}image-column", f"--{prefix}label-column")
    for flag, value in zip(flags, columns.values(), strict=True):
        if value and not is_hf_source(str(data)):
            raise ConfigError(
                f"{flag} {value}: only for Hugging Face sources (--{prefix}data hf:NAME_OR_PATH), not {data}"
            )
    return {**columns, "flags": flags}


def _eval_model_args(p: argparse.ArgumentParser, encoders: bool = True) -> None:
    """The model options of the evaluations; ``encoders``: an encoder alone is accepted too (not by visualize,
    which needs the decoder)."""
    source = "a pretraining checkpoint file, or a run folder (its newest checkpoint)"
    if encoders:
        source += (
            "; or an encoder alone: a `mimkit export` .safetensors file, a fine-tuning run or checkpoint (its "
            "classifier's features before the head), or released MAE / timm ViT weights"
        )
    p.add_argument("checkpoint", nargs="?", help=source)
    p.add_argument("--random-init", metavar="MODEL", help="evaluate MODEL at random initialization instead")
    p.add_argument(
        "--img-size",
        type=_number(int, 8),
        nargs="+",
        metavar="PX",
        help="resolution, one value (square) or HEIGHT WIDTH (default: the checkpoint's); another one: a pyramid's "
        "must fit its windows, a ViT's position embedding is resampled to it; visualize: a --random-init model's only",
    )
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument(
        "--in-chans",
        type=_number(int, 1),
        default=3,
        help="channels of the --random-init model (a checkpoint keeps its own); not 3: images read at full bit depth "
        "with exactly that many channels and normalised with statistics measured from --data",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `mimkit` argument parser with every subcommand."""
    from mimkit.config import PretrainConfig, add_config_arguments

    parser = OneLineParser(prog="mimkit", description="Efficient masked-image-modeling pretraining.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a model (single process, or under torchrun for DDP)",
        description="Pretrain with a recipe and/or flags. Precedence: defaults < --recipe < flags. "
        "Multi-GPU / multi-node: torchrun --nproc-per-node N -m mimkit.cli pretrain ...",
    )
    add_config_arguments(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    from mimkit.eval.finetune import FinetuneConfig

    p = sub.add_parser(
        "finetune",
        help="end-to-end classification fine-tuning (layer decay, RandAugment, mixup)",
        description="Fine-tune a pretrained encoder (--pretrained RUN|CKPT|EXPORT.safetensors) or a "
        "random-init baseline (--random-init MODEL) on a labelled ImageFolder. Top-1/top-5 "
        "on val after every epoch; best.pt and rotating checkpoints; --resume auto.",
    )
    add_config_arguments(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("knn", help="weighted cosine kNN top-1 on a labelled ImageFolder (train/ and val/)")
    _eval_model_args(p)
    p.add_argument(
        "--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/, or a labelled hf: dataset"
    )
    _column_args(p)
    p.add_argument("--k", type=POS_INT, default=20)
    p.add_argument("--temperature", type=POS_FLOAT, default=0.07)
    p.add_argument("--pool", choices=["avg", "cls"], default="avg", help="feature: mean of patch tokens, or cls")
    p.add_argument("--batch-size", type=POS_INT, default=128)
    p.add_argument("--num-workers", type=NONNEG_INT, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser(
        "linprobe",
        help="linear probe on frozen features (BatchNorm + Linear, LARS; MAE protocol)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _eval_model_args(p)
    p.add_argument(
        "--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/, or a labelled hf: dataset"
    )
    _column_args(p)
    p.add_argument("--epochs", type=POS_INT, default=90)
    p.add_argument("--batch-size", type=POS_INT, default=256)
    p.add_argument("--blr", type=POS_FLOAT, default=0.1, help="lr = blr x batch / 256")
    p.add_argument("--warmup-epochs", type=NONNEG_INT, default=10)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="augment and re-encode every epoch instead of caching features once (slow on CPU)",
    )
    p.add_argument("--pool", choices=["avg", "cls"], default="avg")
    p.add_argument("--num-workers", type=NONNEG_INT, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", help="folder for linprobe.json and the head's weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_linprobe)

    p = sub.add_parser(
        "export",
        help="write the encoder (pretraining) or the classifier (fine-tuning) as safetensors with timm key names",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file or run folder (a fine-tuning run folder: its best.pt, else its newest checkpoint)",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument(
        "--head-classes",
        type=NONNEG_INT,
        default=None,
        help="include a zero-initialized classifier of this many classes (default: the timm model's, "
        "so its default create_model call loads strictly); 0 = encoder only",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("visualize", help="reconstruction figure (original, encoder input, reconstruction, pasted)")
    _eval_model_args(p, encoders=False)
    p.add_argument(
        "--data",
        required=True,
        help="images to show: any --data source of pretrain (val/ of an ImageFolder root if present; tar shards and "
        "hf: sources too)",
    )
    _column_args(p, labels=False)
    p.add_argument("--num", type=_number(int, 1, 64), default=8, help="number of images (1-64)")
    p.add_argument(
        "--stats",
        choices=["target", "visible"],
        default="target",
        help="de-normalize norm-pixel predictions with each patch's true statistics (target) or with "
        "the visible patches' statistics only (visible, no leakage)",
    )
    p.add_argument(
        "--bands",
        type=_number(int, 0),
        nargs=3,
        default=None,
        metavar="B",
        help="images of more than 3 channels: the bands shown as red, green, blue (default: the run's --viz-bands, "
        "else 0 1 2)",
    )
    p.add_argument("--out", default="reconstruction.png")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser(
        "bench",
        help="time training steps of models side by side on synthetic batches",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="registered model names, each optionally "
        "with its own options as name:key=value,key=value (grad_checkpointing=true turns activation "
        "checkpointing on for that model); ratios are vs the first (at each --img-size)",
    )
    p.add_argument("--batch-size", type=POS_INT, default=32)
    p.add_argument(
        "--img-size", type=_number(int, 8), nargs="+", help="one or more resolutions (default: each model's)"
    )
    p.add_argument("--steps", type=POS_INT, default=10, help="timed steps")
    p.add_argument("--warmup", type=NONNEG_INT, default=3, help="untimed warm-up steps")
    p.add_argument(
        "--rounds",
        type=POS_INT,
        default=1,
        help="repeat the whole set, reversing the model order every other round; speed ratios are the median of the "
        "per-round ratios, with their range",
    )
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--cpu-autocast", action="store_true", help="use bf16 autocast on CPU too")
    for name, text in (
        (
            "cpu_linear",
            "auto: tall, narrow fp32 CPU products through oneDNN (compiled too), as `mimkit pretrain` runs them; "
            "aten: PyTorch's linear and GELU everywhere",
        ),
        (
            "host_huge_pages",
            "auto: the C heap in 2 MiB pages where the system allows (the command starts itself again once), as "
            "`mimkit pretrain` runs; off: as the environment gives it",
        ),
    ):  # the pretrain options' choices and defaults
        choices = PretrainConfig.__dataclass_fields__[name].metadata["choices"]
        p.add_argument("--" + name.replace("_", "-"), choices=choices, default=getattr(PretrainConfig, name), help=text)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", type=_kv, help="option for every model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "compare",
        help="pretrain several models or variants with the same budget and seeds, then kNN against random init",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="pretraining images (any --data source of pretrain)")
    p.add_argument(
        "--eval-data",
        required=True,
        help="a labelled ImageFolder root or hf: dataset for the kNN evaluation",
    )
    _column_args(p, labels=False)
    _column_args(p, "eval-")
    p.add_argument(
        "--models", nargs="+", required=True, help="registered models, each optionally name:key=value,key=value"
    )
    p.add_argument("--seeds", type=NONNEG_INT, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", default=None, help="base settings of every run (lr, warm-up, ...; `mimkit recipes`)")
    p.add_argument("--epochs", type=POS_INT, default=10, help="epochs of every run (sets the lr schedule)")
    p.add_argument("--minutes", type=POS_FLOAT, default=None, help="also cut every run at this wall-clock time")
    p.add_argument("--img-size", type=_number(int, 8), default=None, help="(default: each model's)")
    p.add_argument("--batch-size", type=POS_INT, default=64)
    p.add_argument(
        "--in-chans",
        type=_number(int, 1, 1024),
        default=None,
        help="as pretrain --in-chans, for every run and its random-init baseline (default: the recipe's, else 3)",
    )
    p.add_argument("--num-workers", type=_number(int, -1), default=None, help="as pretrain --num-workers")
    p.add_argument("--output", default="runs/compare", help="one folder per run, compare.json/.md, loss.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "bench-data",
        help="decoded + augmented images/s of a data source through the training loader, per number of workers, "
        "next to a model's training-step rate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="any --data source of `mimkit pretrain`")
    p.add_argument("--img-size", type=_number(int, 8), default=None, help="crop size (default: --model's, else 224)")
    p.add_argument("--batch-size", type=POS_INT, default=64)
    p.add_argument("--workers", type=NONNEG_INT, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("--batches", type=POS_INT, default=10, help="timed batches per worker count")
    p.add_argument("--warmup", type=NONNEG_INT, default=2, help="batches before timing (start-up, caches)")
    p.add_argument("--in-chans", type=_number(int, 1, 1024), default=3, help="as pretrain --in-chans")
    p.add_argument("--image-column", default="", help="hf: sources: as pretrain --image-column")
    p.add_argument("--hf-streaming", action="store_true", help="hf: sources: stream")
    p.add_argument("--shard-index", default="", help="tar shards: as pretrain --shard-index")
    p.add_argument("--model", default=None, help="also time this model's training step (images/s per process)")
    p.add_argument("--steps", type=POS_INT, default=5, help="timed model steps")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (for --model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_data)

    p = sub.add_parser(
        "mask-frequency",
        help="heat maps of how often each unit is masked: random vs CoMA's complementary masks (CoMA Fig. 2)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--grid", type=_number(int, 2, 64), default=7, help="units per side (7 = 224 px / 32 px units)")
    p.add_argument("--ratio", type=_number(float, 0, 1, low_open=True, high_open=True), default=0.6)
    p.add_argument("--iterations", type=POS_INT, default=1600)
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.add_argument("--out", default="mask_frequency.png")
    p.set_defaults(func=cmd_mask_frequency)

    p = sub.add_parser(
        "ablate-masking",
        help="UM-MAE Table 1 at small scale: random / grid / uniform / uniform + "
        "secondary masking on the same ViT, equal steps; loss and kNN table",
    )
    p.add_argument("--data", required=True, help="images (labelled ImageFolder root for the kNN column)")
    p.add_argument("--output", default="runs/ablate_masking")
    p.add_argument("--recipe", default="ablation_vit_nano_cpu", help="base recipe (a UM-MAE ViT model)")
    p.add_argument("--epochs", type=POS_INT, help="epochs per variant (default: the recipe's)")
    p.add_argument("--no-knn", action="store_true", help="skip the kNN column (unlabelled data)")
    p.add_argument("--seed", type=NONNEG_INT, default=0)
    p.set_defaults(func=cmd_ablate_masking)

    p = sub.add_parser(
        "shards",
        help="pack a folder tree or a file list into WebDataset tar shards (the way past ~1 M files)",
        description="Packs the images of --data (a folder tree, an ImageFolder root's train/, or a file list) into "
        "OUT/shard-NNNNNN.tar with OUT/mimkit-shards.json (per-shard counts, skipped files). Every image is "
        "decoded once to check it; unreadable ones are skipped and listed. Then: mimkit pretrain --data OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="images to pack")
    p.add_argument("--out", required=True, help="a new folder for the shards")
    p.add_argument("--shard-size", type=POS_INT, default=5000, help="images per shard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("models", help="list registered pretraining models, or the options of one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list bundled recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("demo", help="the bundled demo: short pretraining, kNN vs random init, reconstruction figure")
    p.add_argument("--data", help="images (default: the bundled sample set)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--minutes", type=POS_FLOAT, default=3.0, help="pretraining time budget")
    p.set_defaults(func=cmd_demo)
    return parser


def _kv(text: str):
    from mimkit.config import _parse_kv

    return _parse_kv(text)


def main(argv=None) -> int:
    """The ``mimkit`` command; returns the exit code (see EPILOG and docs/reliability.md)."""
    import mimkit  # noqa: F401  (compat shim + model registries)
    from mimkit.errors import MimkitError

    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a one-line usage error (2)
        return int(done.code or 0)
    args.argv = argv  # the command as given, for records such as the ablation table
    args.process_entry = entry  # the program itself, which may start again (``_host_huge_pages``)
    try:
        code = args.func(args)
    except MimkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine's, not the input's: an output that could not be written (a figure, a table)
        if err.errno not in WRITE_ERRNOS:
            raise  # anything else is unexpected: its traceback
        from mimkit.errors import EXIT_SAVE_FAILED

        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}; free space, or give a folder this user can write", file=sys.stderr)
        return EXIT_SAVE_FAILED
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
