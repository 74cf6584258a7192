"""Run configuration: dataclass defaults < recipe YAML < command-line flags. Unknown keys are errors."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the option and the fix."""


def opt(default, help: str, group: str = "training", **kw):
    factory = kw.pop("factory", None)
    meta = {"help": help, "group": group, **kw}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PretrainConfig:
    # data
    data: str = opt("", "Images: an ImageFolder root (train/, optional val/), any folder tree of images, or a text "
                        "file with one image path per line. Labels are never used for pretraining.", "data")
    img_size: int | None = opt(None, "Input resolution in px (default: the model's).", "data")
    mean: list[float] = opt(None, "Per-channel normalization mean.", "data",
                            factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = opt(None, "Per-channel normalization std.", "data", factory=lambda: [0.229, 0.224, 0.225])
    compute_mean_std: bool = opt(False, "Compute mean/std from (a sample of) the data instead of using "
                                        "mean/std; the values are written to the saved config.", "data")
    crop_scale: list[float] = opt(None, "RandomResizedCrop scale range.", "data", factory=lambda: [0.2, 1.0])
    hflip: float = opt(0.5, "Horizontal-flip probability.", "data")
    min_image_size: int = opt(8, "Images whose shorter side is below this (px) are skipped and reported.", "data")
    num_workers: int = opt(-1, "Data-loading worker processes per GPU/process (-1: automatic).", "data")
    # model
    model: str = opt("mae_vit_base_patch16", "Pretraining model: method + architecture (`mimkit models`).",
                     "model")
    mask_ratio: float | None = opt(None, "Fraction of patches masked (default: the method's).", "model")
    norm_pix_loss: bool | None = opt(None, "Per-patch normalized pixel targets (default: the method's).", "model")
    drop_path: float = opt(0.0, "Stochastic depth rate of the encoder.", "model")
    model_args: dict = opt(None, "Extra model options as a mapping (CLI: --model-arg key=value, repeatable); "
                                 "`mimkit models NAME` lists them.", "model", factory=dict)
    # optimization
    epochs: int = opt(400, "Pretraining epochs.")
    batch_size: int = opt(64, "Images per GPU/process per step.")
    accum_steps: int = opt(1, "Gradient accumulation steps (effective batch = batch_size x accum x world).")
    blr: float = opt(1.5e-4, "Base learning rate: lr = blr x effective_batch / the method's reference batch "
                             "(256 for the MAE family, 512 for SimMIM).")
    lr: float | None = opt(None, "Absolute learning rate; overrides blr when set.")
    min_lr: float = opt(0.0, "Final learning rate of the cosine schedule.")
    warmup_epochs: float = opt(40, "Linear warm-up epochs (per-iteration schedule).")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to biases and 1-D parameters).")
    betas: list[float] | None = opt(None, "AdamW betas (default: the method's, (0.9, 0.95) for MAE).")
    grad_clip: float | None = opt(None, "Clip the gradient norm to this value (default: the method's; MAE: off).")
    precision: str = opt("bf16", "fp32 | bf16 | fp16. bf16/fp16 use autocast on GPU; fp16 adds loss scaling. "
                                 "On CPU bf16 autocast is used only if `cpu_autocast` is set.",
                         choices=["fp32", "bf16", "fp16"])
    cpu_autocast: bool = opt(False, "Allow bf16 autocast on CPU (often slower than fp32 on CPUs without AMX).")
    compile: bool = opt(False, "torch.compile the model.")
    max_nonfinite: int = opt(5, "Stop after this many consecutive steps with a non-finite loss or gradient "
                                "(each is skipped).")
    seed: int = opt(0, "Random seed.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (for smoke tests and benchmarks).")
    time_limit_min: float | None = opt(None, "Stop (with a checkpoint) after this many minutes of training.")
    # outputs
    output: str = opt("runs/pretrain", "Output folder: checkpoints, config.yaml, metrics.jsonl, TensorBoard.",
                      "output")
    resume: str = opt("auto", "auto: continue from the newest checkpoint in --output if any; a path: that "
                              "checkpoint; none: start fresh.", "output")
    save_every_epochs: int = opt(1, "Write a checkpoint every N epochs (and always at the end).", "output")
    save_every_minutes: float = opt(30.0, "Also write a checkpoint when this many minutes passed since the last.",
                                    "output")
    keep_epochs_every: int = opt(50, "Also keep a permanent copy (epoch-NNNN.pt) of every Nth epoch's checkpoint "
                                     "(0: none).", "output")
    keep_last: int = opt(2, "Number of most recent checkpoint-*.pt files kept (older ones are deleted).", "output")
    log_every: int = opt(20, "Write metrics every N optimizer steps.", "output")
    tensorboard: bool = opt(True, "Write TensorBoard scalars.", "output")
    progress: bool = opt(True, "Show a progress bar.", "output")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def config_from_dict(cls, values: dict, source: str = "config"):
    known = {f.name for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown option '{k}'.{_suggest(k, known)} "
                          f"`mimkit pretrain --help` lists every option.")
    return cls(**values)


RECIPE_DIRS = [Path(__file__).resolve().parent.parent / "recipes", Path(__file__).resolve().parent / "recipes"]


def available_recipes() -> list[str]:
    names = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for d in RECIPE_DIRS:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(f"recipe '{name_or_path}' not found (neither a file nor a bundled recipe)."
                      f"{_suggest(name_or_path, available_recipes())} Bundled: {', '.join(available_recipes())}")


def load_recipe(name_or_path: str) -> dict:
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
    parser.add_argument("--recipe", default=None,
                        help="Recipe name (see `mimkit recipes`) or YAML file; flags given here override it.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    hidden = set(getattr(cls, "hidden_options", ()))
    for f in fields(cls):
        if f.name in hidden:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"] + " options"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default})"
        ftype = str(f.type)
        if f.name == "model_args":
            group.add_argument("--model-arg", dest="model_args", action="append", type=_parse_kv,
                               metavar="KEY=VALUE", help=help_text)
        elif ftype.startswith("bool"):
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif ftype.startswith("list"):
            group.add_argument(_flag(f.name), dest=f.name, nargs="+", type=float, default=None, help=help_text)
        else:
            base = ftype.split("|")[0].strip()
            conv = {"int": int, "float": float, "str": str}.get(base, str)
            group.add_argument(_flag(f.name), dest=f.name, type=conv, default=None, choices=meta.get("choices"),
                               help=help_text)


def config_from_args(args: argparse.Namespace, cls):
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    tmp.replace(path)
