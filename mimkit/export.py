"""Export the pretrained encoder as safetensors with timm key names."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import mimkit


def export_encoder(
    model, path: str | Path, head_classes: int | None = None, source: str = "", mean=None, std=None
) -> dict:
    """Write the encoder; returns the metadata (timm model name and the kwargs to create it).

    With ``head_classes`` (default: the timm model's own ``num_classes``, usually 1000) a zero-initialized
    classifier ``head`` is included, so that ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path))`` loads strictly. Pass 0 to write the encoder alone (then create the
    model with ``num_classes=0`` or any new class count). ``mean`` / ``std`` (the pretraining run's normalization)
    are kept with the input size as ``data_cfg``: what timm's ``resolve_data_config`` should give for this encoder
    (``data_cfg_overlay``).
    """
    state, timm_name, timm_kwargs = model.export_encoder()
    state = {k: v.contiguous() for k, v in state.items()}
    if head_classes is None:
        cfg = timm.models.get_pretrained_cfg(timm_name)  # None for a model registered without one
        head_classes = (cfg.num_classes if cfg is not None else 0) or 0
    if head_classes:
        dim = model.encoder.num_features
        state["head.weight"] = torch.zeros(head_classes, dim)
        state["head.bias"] = torch.zeros(head_classes)
    meta = {
        "timm_model": timm_name,
        "timm_kwargs": json.dumps(timm_kwargs),
        "head": str(head_classes or 0),
        "format": "timm",
        "mimkit_version": mimkit.__version__,
        "source": str(source),
    }
    if mean is not None and std is not None:
        from mimkit.models._size import pair

        size = pair(timm_kwargs.get("img_size", model.img_size))
        chans = int(timm_kwargs.get("in_chans", 3))
        meta["data_cfg"] = json.dumps({"input_size": [chans, *size], "mean": list(mean), "std": list(std)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return meta


def data_cfg_overlay(meta: dict) -> dict:
    """The exported encoder's input size and normalization for ``pretrained_cfg_overlay`` (so that timm's
    ``resolve_data_config`` gives them, not the architecture's ImageNet defaults); empty for older exports."""
    cfg = json.loads(meta.get("data_cfg", "{}"))
    return {k: tuple(v) for k, v in cfg.items()}


def create_timm_from_export(path: str | Path, num_classes: int | None = None, **overrides):
    """Convenience: a timm model of the exported architecture with the exported weights loaded."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    kwargs = {**json.loads(meta["timm_kwargs"]), **overrides}
    overlay = {**data_cfg_overlay(meta), "file": str(path), "custom_load": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
