"""Run configuration: dataclass defaults < recipe YAML < command-line flags. Unknown keys are errors."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mimkit.errors import ConfigError

__all__ = ["ConfigError", "PretrainConfig", "config_from_args", "config_from_dict", "load_recipe", "opt"]


def opt(default, help: str, group: str = "training", **kw):
    """A config field: ``help`` and ``group`` for ``--help``; ``min`` / ``max`` (inclusive), ``gt`` (exclusive
    lower bound), ``lt`` (exclusive upper bound), ``choices`` and ``length`` (lists) are checked by
    ``validate_config``."""
    factory = kw.pop("factory", None)
    meta = {"help": help, "group": group, **kw}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# the help of every option that names an hf: dataset's label column (knn, linprobe, finetune, compare, pretrain)
LABEL_COLUMN_HELP = (
    "the column holding the labels (default: the first ClassLabel column, else one named "
    "label/labels/class/category/target/cls, else the one column of integers or strings whose values repeat)"
)


@dataclass
class PretrainConfig:
    # data
    """Every pretraining option, checked in ``__post_init__`` (bad values are one-line ConfigErrors)."""

    data: str = opt(
        "",
        "Images: an ImageFolder root (train/, optional val/), any folder tree of images, a text file with one image "
        "path per line, WebDataset tar shards (a folder of .tar files, train-{000000..000099}.tar, "
        "pipe:COMMAND; see `mimkit shards`), or a Hugging Face dataset hf:NAME_OR_PATH[:SPLIT] (Parquet/Arrow; "
        "see --image-column, --hf-streaming). Labels are never used for pretraining.",
        "data",
    )
    img_size: int | list[int] | None = opt(
        None,
        "Input size in px: one value (square) or HEIGHT WIDTH (MAE, SimMIM, LoMaR, UM-MAE; each side must fit the "
        "backbone's window rules) (default: the model's).",
        "data",
        min=8,
    )
    in_chans: int = opt(
        3,
        "Image channels the model takes. 3: every image becomes 8-bit RGB. Any other number: images are read at full "
        "bit depth (8/16/32-bit, float; multi-band TIFF through tifffile) and must have exactly this many channels; "
        "others are skipped and counted (docs/data.md).",
        "data",
        min=1,
        max=1024,
    )
    mean: list[float] = opt(
        None,
        "Per-channel normalization mean, one value per channel (default: ImageNet's for 3 channels, computed from "
        "the data for any other --in-chans).",
        "data",
    )
    std: list[float] = opt(None, "Per-channel normalization std (default: as --mean).", "data")
    compute_mean_std: bool = opt(
        False,
        "Compute mean/std from (a sample of) the data instead of using "
        "mean/std; the values are written to the saved config.",
        "data",
    )
    viz_bands: list[int] = opt(
        None,
        "Reconstruction figures of images with more than 3 channels: the three bands shown as red, green, blue "
        "(default 0 1 2; 1-channel images are shown grey).",
        "output",
        length=3,
        min=0,
    )
    crop_scale: list[float] = opt(
        None,
        "RandomResizedCrop scale range: two values, 0 < MIN <= MAX <= 1.",
        "data",
        factory=lambda: [0.2, 1.0],
        length=2,
        gt=0,
        max=1,
    )
    hflip: float = opt(0.5, "Horizontal-flip probability.", "data", min=0, max=1)
    min_image_size: int = opt(
        8, "Images whose shorter side is below this (px) are skipped and reported.", "data", min=1
    )
    num_workers: int = opt(-1, "Data-loading worker processes per GPU/process (-1: automatic).", "data", min=-1)
    shard_index: str = opt(
        "", "Tar shards: the mimkit-shards.json with their sample counts (needed for pipe: sources).", "data"
    )
    image_column: str = opt(
        "",
        "hf: sources: the column holding the images (default: the first of Image type, one named image/img, or one of "
        "image file paths).",
        "data",
    )
    hf_streaming: bool = opt(
        False,
        "hf: sources: stream the rows (datasets' streaming=True) instead of converting them to a memory-mapped Arrow "
        "cache first; for collections too large to copy, or remote ones.",
        "data",
    )
    shuffle_buffer: int = opt(
        1000,
        "Tar shards and streamed hf: sources: samples held in the shuffle buffer (1: shard order only).",
        "data",
        min=1,
    )
    # model
    model: str = opt("mae_vit_base_patch16", "Pretraining model: method + architecture (`mimkit models`).", "model")
    mask_ratio: float | None = opt(None, "Fraction of patches masked (default: the method's).", "model", gt=0, lt=1)
    norm_pix_loss: bool | None = opt(None, "Per-patch normalized pixel targets (default: the method's).", "model")
    drop_path: float = opt(0.0, "Stochastic depth rate of the encoder.", "model", min=0, lt=1)
    init: str = opt(
        "",
        "Start from these weights instead of a random initialization (a fresh run only; a resume uses its "
        "checkpoint): MAE's released ViT files (encoder or *_full), timm ViT weights, UM-MAE's Swin/PVT/ViT files, "
        "SimMIM's Swin files, or a mimkit checkpoint/export. Loaded, new and ignored tensors are reported in "
        "DIR/init-report.json (docs/transfer.md).",
        "model",
    )
    model_args: dict = opt(
        None,
        "Extra model options as a mapping (CLI: --model-arg key=value, repeatable); `mimkit models NAME` lists them.",
        "model",
        factory=dict,
    )
    # optimization
    epochs: int = opt(400, "Pretraining epochs.", min=1)
    batch_size: int = opt(64, "Images per GPU/process per step.", min=1)
    accum_steps: int = opt(1, "Gradient accumulation steps (effective batch = batch_size x accum x world).", min=1)
    blr: float = opt(
        1.5e-4,
        "Base learning rate: lr = blr x effective_batch / the method's reference batch "
        "(256 for the MAE family, 512 for SimMIM); 0 freezes the weights (a control).",
        min=0,
    )
    lr: float | None = opt(None, "Absolute learning rate; overrides blr when set.", min=0)
    min_lr: float = opt(0.0, "Final learning rate of the cosine schedule.", min=0)
    warmup_epochs: float = opt(40, "Linear warm-up epochs (per-iteration schedule).", min=0)
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases and 1-D parameters).", min=0)
    betas: list[float] | None = opt(
        None, "AdamW betas (default: the method's, (0.9, 0.95) for MAE).", length=2, min=0, lt=1
    )
    grad_clip: float | None = opt(None, "Clip the gradient norm to this value (default: the method's; MAE: off).", gt=0)
    precision: str = opt(
        "bf16",
        "fp32 | bf16 | fp16. bf16/fp16 use autocast on GPU; fp16 adds loss scaling. "
        "On CPU bf16 autocast is used only if `cpu_autocast` is set.",
        choices=["fp32", "bf16", "fp16"],
    )
    cpu_autocast: bool = opt(False, "Allow bf16 autocast on CPU (often slower than fp32 on CPUs without AMX).")
    compile: bool = opt(False, "torch.compile the model.")
    host_memory: str = opt(
        "keep",
        "keep: the C allocator (glibc) keeps freed host memory for reuse instead of unmapping it, so a CPU step does "
        "not fault in fresh pages for every tensor (SimMIM's CPU step about 1.15x faster; the resident size stays at "
        "its peak; docs/benchmarks.md); system: the C library's defaults (docs/design.md).",
        choices=["keep", "system"],
    )
    host_huge_pages: str = opt(
        "auto",
        "auto: with host_memory keep, the `mimkit` command starts itself again once with glibc's tunable "
        "glibc.malloc.hugetlb=1, which backs the C heap with 2 MiB pages where the kernel's transparent huge pages "
        "are in madvise mode and glibc is 2.35 or later (fewer address-cache misses: UM-MAE PVT-S's CPU step about "
        '1.05x faster; docs/benchmarks.md, "Huge pages"); nothing elsewhere, or when GLIBC_TUNABLES sets it; '
        "off: no restart, the heap as the environment gives it (docs/design.md).",
        choices=["auto", "off"],
    )
    cpu_linear: str = opt(
        "auto",
        "auto: on the CPU in fp32, the tall, narrow MLP products of a pyramid's first stages (8192 rows or more, "
        "64-128 channels on one side, 4-8x that on the other) go through oneDNN with the bias fused (SimMIM PVT-S's "
        "step about 1.06x faster), under torch.compile too, with ATen's GELU after them; aten: PyTorch's own linear "
        "and GELU everywhere (docs/design.md).",
        choices=["auto", "aten"],
    )
    grad_checkpointing: bool = opt(
        False,
        "Activation checkpointing in every encoder and decoder block: activations are recomputed in the backward "
        "(less memory for larger models or batches, about one more forward pass of compute; same results).",
    )
    max_bad_steps: int = opt(
        5,
        "Consecutive skipped steps (non-finite loss or gradient, or a loss spike) after which "
        "the run has diverged (see --on-divergence).",
        "safety",
        min=1,
    )
    loss_spike_factor: float = opt(
        5.0,
        "Skip a step whose loss exceeds this many times the median of the last 100 "
        "accepted steps (after 20 steps; 0: off).",
        "safety",
        min=0,
    )
    param_norm_factor: float = opt(
        10.0,
        "Diverged when the parameter norm exceeds this many times its value at the "
        "last verified checkpoint or run start; never saved (0: only non-finite).",
        "safety",
        min=0,
    )
    on_divergence: str = opt(
        "rollback",
        "rollback: reload the last verified checkpoint with a lower learning rate "
        "(--rollback-lr-factor, at most --max-rollbacks times), then stop; stop: "
        "stop at once.",
        "safety",
        choices=["rollback", "stop"],
    )
    rollback_lr_factor: float = opt(0.5, "Learning-rate multiplier applied at each rollback.", "safety", gt=0, max=1)
    max_rollbacks: int = opt(3, "Rollbacks allowed in one run before the guard stops it.", "safety", min=0)
    strategy: str = opt(
        "ddp",
        "Several processes: ddp (a full replica per GPU) or fsdp (PyTorch FSDP2: parameters, gradients and optimizer "
        "state sharded over the ranks, every transformer block gathered for its own compute; bf16 compute with fp32 "
        "gradient reduction under --precision bf16). Checkpoints: see --checkpoint-format (docs/clusters.md).",
        "training",
        choices=["ddp", "fsdp"],
    )
    checkpoint_format: str = opt(
        "auto",
        "file: one verified checkpoint-N.pt (an FSDP run gathers the full state on rank 0 to write it); sharded: a "
        "torch.distributed.checkpoint folder checkpoint-N.dcp where every rank writes and reads back only its own "
        "shards (for models whose full state is too big or too slow to gather); auto: sharded under --strategy fsdp "
        "with several processes, else file. Either resumes on any number of processes and exports the same.",
        "output",
        choices=["auto", "file", "sharded"],
    )
    dist_timeout_min: float = opt(
        30.0,
        "Timeout of collective operations across ranks, and of the wait for every rank to join at the start: a rank "
        "that stopped responding (or never started) makes the others exit with a message after this long.",
        "safety",
        gt=0,
    )
    requeue: bool = opt(
        False,
        "On SIGUSR1 (SLURM's warning signal: sbatch --signal=USR1@120) save, then requeue the job with `scontrol "
        "requeue $SLURM_JOB_ID`; the requeued job resumes from that checkpoint (docs/clusters.md).",
        "safety",
    )
    seed: int = opt(0, "Random seed.", min=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (for smoke tests and benchmarks).", min=1)
    time_limit_min: float | None = opt(None, "Stop (with a checkpoint) after this many minutes of training.", gt=0)
    # outputs
    output: str = opt("runs/pretrain", "Output folder: checkpoints, config.yaml, metrics.jsonl, TensorBoard.", "output")
    resume: str = opt(
        "auto",
        "auto: continue from the newest verified checkpoint in --output if any; a path: that checkpoint (a .pt file "
        "or a sharded .dcp folder); none: start fresh (an error if --output holds checkpoints, unless --overwrite).",
        "output",
    )
    overwrite: bool = opt(
        False,
        "With --resume none: move the earlier run's outputs in --output into "
        "replaced-<time>/ (nothing is deleted) and start fresh.",
        "output",
    )
    save_every_epochs: int = opt(1, "Write a checkpoint every N epochs (and always at the end).", "output", min=1)
    save_every_minutes: float = opt(
        30.0, "Also write a checkpoint when this many minutes passed since the last.", "output", gt=0
    )
    keep_epochs_every: int = opt(
        50,
        "Also keep a permanent copy (epoch-NNNN.pt or .dcp) of every Nth epoch's checkpoint (0: none).",
        "output",
        min=0,
    )
    keep_last: int = opt(
        2,
        "Number of verified checkpoints (checkpoint-*.pt files or .dcp folders) kept; an older one is deleted "
        "only when this many newer verified ones exist.",
        "output",
        min=1,
    )
    log_every: int = opt(20, "Write metrics every N optimizer steps.", "output", min=1)
    tensorboard: bool = opt(True, "Write TensorBoard scalars.", "output")
    progress: bool = opt(True, "Show a progress bar.", "output")
    logger: str = opt(
        "",
        "Extra metric sinks, comma-separated: csv (DIR/metrics.csv), wandb, mlflow (optional installs; wandb follows "
        "WANDB_MODE, e.g. offline; mlflow writes DIR/mlruns unless MLFLOW_TRACKING_URI is set; a resume continues the "
        "same wandb and MLflow runs, their ids kept in DIR/tracking.json). metrics.jsonl and TensorBoard are always "
        "written (unless --no-tensorboard).",
        "output",
    )
    recon_every: int = opt(
        0,
        "Every N epochs, a reconstruction grid of 8 fixed images to DIR/recon/ and the loggers (0: off).",
        "output",
        min=0,
    )
    monitor_data: str = opt(
        "",
        "A labelled ImageFolder root or hf: dataset: the encoder's kNN top-1 is logged every --monitor-every epochs.",
        "output",
    )
    monitor_every: int = opt(1, "Epochs between kNN evaluations on --monitor-data.", "output", min=1)
    monitor_image_column: str = opt(
        "", "hf: --monitor-data: the column holding the images (default: found as for --image-column).", "output"
    )
    monitor_label_column: str = opt("", f"hf: --monitor-data: {LABEL_COLUMN_HELP}.", "output")

    def __post_init__(self):
        validate_config(self)

    def check_pairs(self) -> None:
        """Checks that involve several options (after each option's own type and range)."""
        lo, hi = self.crop_scale
        if lo > hi:
            raise ConfigError(
                f"crop_scale (--crop-scale) = {self.crop_scale}: MIN must not exceed MAX, e.g. --crop-scale 0.2 1.0"
            )
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"mean (--mean) {self.mean} and std (--std) {self.std}: need the same number of values, one per channel"
            )
        if len(self.mean) not in (1, self.in_chans):
            raise ConfigError(
                f"mean (--mean) {self.mean}: {len(self.mean)} values for --in-chans {self.in_chans}; give one value "
                "per channel (or one for all), or --compute-mean-std"
            )
        if self.viz_bands and max(self.viz_bands) >= self.in_chans:
            raise ConfigError(
                f"viz_bands (--viz-bands) = {self.viz_bands}: band numbers start at 0 and must be below --in-chans "
                f"{self.in_chans}"
            )
        pattern = self.data.startswith("pipe:") or "{" in self.data or ":" in self.data
        if self.data and not pattern and not Path(self.data).expanduser().exists():
            raise ConfigError(
                f"data (--data) = {self.data!r}: no such file or folder. --data takes a folder of "
                "images, an ImageFolder root (train/, optional val/), a text file listing image paths, or tar shards "
                "(a folder of .tar files, a brace pattern, pipe:COMMAND)."
            )
        import importlib.util

        for name in (x.strip() for x in self.logger.split(",") if x.strip()):
            if name not in ("csv", "wandb", "mlflow"):
                raise ConfigError(
                    f"logger (--logger) = {self.logger!r}: unknown logger {name!r}; use csv, wandb, mlflow"
                )
            if name != "csv" and importlib.util.find_spec(name) is None:
                raise ConfigError(f"logger (--logger) = {self.logger!r}: {name} is not installed; pip install {name}")
        monitor = self.monitor_data
        if monitor and not monitor.startswith("hf:") and not (Path(monitor).expanduser() / "train").is_dir():
            raise ConfigError(
                f"monitor_data (--monitor-data) = {monitor!r}: not a labelled ImageFolder root "
                "(train/<class>/..., optional val/<class>/...) or labelled hf: dataset"
            )
        for name in ("monitor_image_column", "monitor_label_column"):
            if getattr(self, name) and not monitor.startswith("hf:"):
                raise ConfigError(
                    f"{_flag_of(name)}: only with a Hugging Face --monitor-data (hf:NAME_OR_PATH), not {monitor!r}"
                )
        for name in ("image_column", "label_column", "hf_streaming"):  # label_column: a subclass's (fine-tuning)
            if getattr(self, name, None) and not self.data.startswith("hf:"):
                raise ConfigError(
                    f"{_flag_of(name)}: only for Hugging Face sources (--data hf:NAME_OR_PATH), not {self.data!r}"
                )
        if self.init and not Path(self.init).expanduser().is_file():
            raise ConfigError(f"init (--init) = {self.init!r}: no such weights file")
        if self.shard_index and not Path(self.shard_index).expanduser().is_file():
            raise ConfigError(f"shard_index (--shard-index) = {self.shard_index!r}: no such file")
        if Path(self.output).expanduser().exists() and not Path(self.output).expanduser().is_dir():
            raise ConfigError(f"output (--output) = {self.output!r}: is a file, not a folder")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std (--std) = {self.std}: every value must be > 0")
        if self.resume not in ("auto", "none"):
            from mimkit.engine.sharded import is_sharded

            given = Path(self.resume).expanduser()
            if given.is_dir() and not is_sharded(given):
                raise ConfigError(
                    f"resume (--resume) = {self.resume!r}: a folder; give one of its checkpoints (checkpoint-N.pt, "
                    "checkpoint-N.dcp), or that folder as --output with --resume auto"
                )
            if not given.is_file() and not is_sharded(given):
                raise ConfigError(
                    f"resume (--resume) = {self.resume!r}: not auto, none, or an existing checkpoint (a .pt file or "
                    "a sharded .dcp folder)"
                )

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (what ``config.yaml`` in the run folder holds)."""
        return dataclasses.asdict(self)


def _flag_of(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _describe_range(meta) -> str:
    parts = []
    for key, sym in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")):
        if key in meta:
            parts.append(f"{sym} {meta[key]}")
    return " and ".join(parts)


def _check_number(name: str, value, kind: str, meta) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        rng = _describe_range(meta)
        raise ConfigError(
            f"{_flag_of(name)} = {value!r}: must be {'an integer' if kind == 'int' else 'a number'}"
            f"{' ' + rng if rng else ''}"
        )
    if isinstance(value, float) and value != value:
        raise ConfigError(f"{_flag_of(name)} = nan: must be a number")
    bad = (
        ("min" in meta and value < meta["min"])
        or ("gt" in meta and value <= meta["gt"])
        or ("max" in meta and value > meta["max"])
        or ("lt" in meta and value >= meta["lt"])
    )
    if bad:
        raise ConfigError(f"{_flag_of(name)} = {value!r}: must be {_describe_range(meta)}")
    return float(value) if kind == "float" else value


def _check_img_size(value, meta) -> int | list[int]:
    """``img_size``: an int, or one or two ints (HEIGHT WIDTH); an int when square, as saved configs have it."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(values) <= 2:
        raise ConfigError(f"img_size (--img-size) = {value!r}: give one size (square) or two: HEIGHT WIDTH")
    sides = [int(_check_number("img_size", v, "int", meta)) for v in values]
    return sides[0] if len(set(sides)) == 1 else sides


def validate_config(cfg) -> None:
    """Check the type and range of every option, then the pairs (``cfg.check_pairs()``); raises ``ConfigError``
    naming the option, its value and what is valid. Numbers given as int for float options become floats."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        meta = f.metadata
        ftype = str(f.type).replace(" ", "")
        optional = ftype.endswith("|None")
        base = ftype.removesuffix("|None")
        if value is None:
            if f.name in ("mean", "std") and cfg.in_chans != 3:  # no standard statistics: measured on the data
                cfg.compute_mean_std = True
                setattr(cfg, f.name, [0.5 if f.name == "mean" else 0.25] * cfg.in_chans)  # until measured
                continue
            if f.name in ("mean", "std"):
                setattr(cfg, f.name, [0.485, 0.456, 0.406] if f.name == "mean" else [0.229, 0.224, 0.225])  # ImageNet
                continue
            if f.name == "viz_bands":
                continue
            if optional or f.name in ("crop_scale", "model_args"):
                if not optional:
                    setattr(cfg, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                continue
            raise ConfigError(f"{_flag_of(f.name)} = null: a value is required")
        if f.name == "img_size":
            setattr(cfg, f.name, _check_img_size(value, meta))
        elif base in ("int", "float"):
            setattr(cfg, f.name, _check_number(f.name, value, base, meta))
        elif base == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{_flag_of(f.name)} = {value!r}: must be true or false")
        elif base == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{_flag_of(f.name)} = {value!r}: must be a string")
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{_flag_of(f.name)} = {value!r}: must be one of {', '.join(meta['choices'])}")
        elif base.startswith("list"):
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{_flag_of(f.name)} = {value!r}: must be a list of numbers")
            if "length" in meta and len(value) != meta["length"]:
                raise ConfigError(f"{_flag_of(f.name)} = {list(value)}: needs exactly {meta['length']} values")
            kind = "int" if base == "list[int]" else "float"
            setattr(cfg, f.name, [_check_number(f.name, v, kind, meta) for v in value])
        elif base == "dict":
            if not isinstance(value, dict):
                raise ConfigError(f"{_flag_of(f.name)} = {value!r}: must be a mapping of key: value")
    cfg.check_pairs()


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def config_from_dict(cls, values: dict, source: str = "config"):
    """A ``cls`` config from ``values``; unknown keys are a ConfigError naming ``source``."""
    known = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{source}: unknown option '{k}'.{_suggest(k, known)} `mimkit pretrain --help` lists every option."
        )
    return cls(**values)


RECIPE_DIRS = [Path(__file__).resolve().parent.parent / "recipes", Path(__file__).resolve().parent / "recipes"]


def available_recipes() -> list[str]:
    """Names of the bundled recipes."""
    names: set[str] = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_recipe(name_or_path: str) -> Path:
    """The YAML file of a bundled recipe name or a path; a ConfigError when neither exists."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for d in RECIPE_DIRS:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(
        f"recipe '{name_or_path}' not found (neither a file nor a bundled recipe)."
        f"{_suggest(name_or_path, available_recipes())} Bundled: {', '.join(available_recipes())}"
    )


def load_recipe(name_or_path: str) -> dict:
    """A recipe's options as a dict (its ``description`` dropped); a ConfigError for bad YAML or a non-mapping."""
    path = resolve_recipe(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of option: value")
    values.pop("description", None)
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, grouped, defaults shown; all default to None so only given flags override."""
    parser.add_argument(
        "--recipe", default=None, help="Recipe name (see `mimkit recipes`) or YAML file; flags given here override it."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hidden = set(getattr(cls, "hidden_options", ()))
    for f in fields(cls):
        if f.name in hidden:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"] + " options"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        help_text = meta["help"] if "(default" in meta["help"] else f"{meta['help']} (default: {default})"
        ftype = str(f.type)
        if f.name == "model_args":
            group.add_argument(
                "--model-arg", dest="model_args", action="append", type=_parse_kv, metavar="KEY=VALUE", help=help_text
            )
        elif ftype.startswith("bool"):
            group.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif f.name == "img_size":
            group.add_argument(
                _flag(f.name), dest=f.name, nargs="+", type=int, default=None, metavar="PX", help=help_text
            )
        elif ftype.startswith("list"):
            kind = int if ftype.startswith("list[int]") else float
            group.add_argument(_flag(f.name), dest=f.name, nargs="+", type=kind, default=None, help=help_text)
        else:
            base = ftype.split("|")[0].strip()
            conv = {"int": int, "float": float, "str": str}.get(base, str)
            group.add_argument(
                _flag(f.name), dest=f.name, type=conv, default=None, choices=meta.get("choices"), help=help_text
            )


def config_from_args(args: argparse.Namespace, cls):
    """A ``cls`` config from the recipe (if any) overlaid with the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "recipe", None):
        values.update(load_recipe(args.recipe))
        source = f"recipe {args.recipe}"
    else:
        source = "config"
    for f in fields(cls):
        given = getattr(args, f.name, None)  # hidden options have no flag: None
        if given is None:
            continue
        if f.name == "model_args":
            merged = dict(values.get("model_args") or {})
            merged.update(dict(given))
            given = merged
        values[f.name] = given
    return config_from_dict(cls, values, source)


def save_yaml(values: dict, path: Path) -> None:
    """Write ``values`` to ``path`` as YAML (atomic replace)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    tmp.replace(path)
