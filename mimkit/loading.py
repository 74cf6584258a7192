"""Rebuild a pretraining model from a mimkit checkpoint (or at random init), with clear errors."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import torch

from mimkit.config import ConfigError, PretrainConfig, config_from_dict
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from mimkit.methods import MIMMethod
from mimkit.models._size import ImageSize

log = logging.getLogger("mimkit")


def load_pretrained(path: str | Path, map_location="cpu") -> tuple[MIMMethod, PretrainConfig]:
    """(method, its config) from a checkpoint file, a sharded checkpoint folder, or a run folder's newest readable
    checkpoint."""
    from mimkit.engine import sharded
    from mimkit.pretraining import build_pretrain_model

    path = Path(path)
    if path.is_dir() and not sharded.is_sharded(path):
        from mimkit.engine.checkpoint import list_checkpoints

        ckpts = list_checkpoints(path)
        if not ckpts:
            raise CheckpointError(f"{path}: folder holds no checkpoint-*.pt file or checkpoint-*.dcp folder")
        for candidate in reversed(ckpts):  # newest readable; a reader never moves or deletes files
            try:
                state = load_checkpoint(candidate)
            except CheckpointError as err:
                log.warning("skipping %s", err)
                continue
            path = candidate
            break
        else:
            raise CheckpointError(f"{path}: none of its {len(ckpts)} checkpoint files is readable")
    else:
        state = load_checkpoint(path)
    if state.get("format") == "sharded":
        state["model"] = sharded.model_state(path)
    if "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a mimkit pretraining checkpoint (expected keys 'model' and 'config')")
    from mimkit.export import FINETUNE_PREFIX

    model_name = str(state["config"].get("model", "")) if isinstance(state["config"], dict) else ""
    if model_name.startswith(FINETUNE_PREFIX):
        raise CheckpointError(
            f"{path}: a fine-tuning checkpoint ({model_name}), not a pretraining one; `mimkit export {path} --out "
            "FILE.safetensors` writes its classifier for timm, and `--pretrained` takes that file"
        )
    cfg = saved_config(state["config"], path)
    try:
        model = build_pretrain_model(cfg)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its model cannot be built here ({err})") from None
    missing, unexpected = load_weights(model, state["model"], path, cfg.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit model '{cfg.model}' (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); was it written by another mimkit version?"
        )
    return model.to(map_location), cfg


def is_encoder_source(path: str | Path) -> bool:
    """Whether ``path`` holds an encoder without its pretraining method: a `mimkit export` .safetensors file, a
    fine-tuning run or checkpoint, or released ViT weights (what ``load_encoder`` reads; ``load_pretrained`` reads
    the rest, and reports a missing or damaged file)."""
    from mimkit.engine.checkpoint import peek_config
    from mimkit.eval.finetune import _is_mimkit_file
    from mimkit.export import FINETUNE_PREFIX

    p = Path(path).expanduser()
    if p.suffix == ".safetensors" or not _is_mimkit_file(str(p)):
        return True
    return str(peek_config(p).get("model", "")).startswith(FINETUNE_PREFIX)


def load_encoder(path: str | Path, map_location="cpu"):
    """(``EncoderFeatures`` over the encoder at ``path``, what its files say of its data: ``in_chans`` and, where
    known, ``mean`` / ``std``) for an encoder source (``is_encoder_source``): the timm model its weights name, built
    without a head and loaded strictly."""
    from mimkit.eval.features import EncoderFeatures
    from mimkit.eval.finetune import load_encoder_source, source_data

    state, name, kwargs = load_encoder_source(str(path))
    hint = " (was it written by another mimkit or timm version?)"
    model = EncoderFeatures.build(state, name, kwargs, path, hint=hint)
    return model.to(map_location), source_data(str(path))


RENAMED_OPTIONS = {"max_nonfinite": "max_bad_steps"}


def saved_config(values, path: Path) -> PretrainConfig:
    """The configuration stored in a checkpoint, readable across mimkit versions: renamed options are mapped,
    options this version does not know are dropped, and run-only settings (resume) are reset."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its 'config' entry is not a mapping")
    known = {f.name for f in fields(PretrainConfig)}
    values = {RENAMED_OPTIONS.get(k, k): v for k, v in values.items()}
    values = {k: v for k, v in values.items() if k in known}
    values.update(resume="none", overwrite=False)
    try:
        return config_from_dict(PretrainConfig, values, f"{path} config")
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored configuration is invalid ({err})") from None


def random_init(model_name: str, img_size: ImageSize | None = None, seed: int = 0, **model_args) -> MIMMethod:
    """A freshly initialised registered method (the random-init baseline of every evaluation)."""
    from mimkit.methods import create_method

    torch.manual_seed(seed)
    if img_size is not None:
        model_args["img_size"] = img_size
    return create_method(model_name, **model_args)
