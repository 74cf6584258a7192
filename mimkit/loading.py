"""Rebuild a pretraining model from a mimkit checkpoint (or at random init), with clear errors."""
from __future__ import annotations

from pathlib import Path

import torch

from mimkit.config import PretrainConfig, config_from_dict
from mimkit.engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from mimkit.methods import MIMMethod


def load_pretrained(path: str | Path, map_location="cpu") -> tuple[MIMMethod, PretrainConfig]:
    from mimkit.engine.trainer import build_model

    path = Path(path)
    if path.is_dir():
        from mimkit.engine.checkpoint import list_checkpoints

        ckpts = list_checkpoints(path)
        if not ckpts:
            raise CheckpointError(f"{path}: folder holds no checkpoint-*.pt file")
        path = ckpts[-1]
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a mimkit pretraining checkpoint (expected keys 'model' and 'config')")
    cfg = config_from_dict(PretrainConfig, dict(state["config"]), f"{path} config")
    model = build_model(cfg)
    missing, unexpected = load_weights(model, state["model"], path, cfg.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model '{cfg.model}' (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); was it written by another mimkit version?")
    return model.to(map_location), cfg


def random_init(model_name: str, img_size: int | None = None, seed: int = 0, **model_args) -> MIMMethod:
    from mimkit.methods import create_method

    torch.manual_seed(seed)
    if img_size is not None:
        model_args["img_size"] = img_size
    return create_method(model_name, **model_args)
