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
    size = timm_kwargs.get("img_size", model.img_size)
    return _write(state, path, timm_name, timm_kwargs, head_classes or 0, source, size, mean, std)


def _write(state: dict, path, timm_name: str, timm_kwargs: dict, head: int, source, size, mean, std, **extra) -> dict:
    """``state`` as a safetensors file at ``path`` with the metadata every export carries (the timm model and the
    options to create it, the head's class count, the source; the input ``size`` and normalization as ``data_cfg``
    when ``mean`` and ``std`` are known) plus ``extra``; returns the metadata."""
    meta = {
        "timm_model": timm_name,
        "timm_kwargs": json.dumps(timm_kwargs),
        "head": str(head),
        "format": "timm",
        "mimkit_version": mimkit.__version__,
        "source": str(source),
        **extra,
    }
    if mean is not None and std is not None:
        from mimkit.models._size import pair

        chans = int(timm_kwargs.get("in_chans", 3))
        meta["data_cfg"] = json.dumps({"input_size": [chans, *pair(size)], "mean": list(mean), "std": list(std)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(state, str(path), metadata=meta)  # safetensors writes a temporary file and renames it
    except Exception as err:  # safetensors' own error type for I/O failures (disk full, a vanished folder)
        from mimkit.errors import SaveFailed

        raise SaveFailed(f"{path}: not written ({err}); free space or give another --out") from None
    return meta


def data_cfg_overlay(meta: dict) -> dict:
    """The exported encoder's input size and normalization for ``pretrained_cfg_overlay`` (so that timm's
    ``resolve_data_config`` gives them, not the architecture's ImageNet defaults); empty for older exports. For a
    fine-tuned classifier also its class count: timm drops a file's head whose class count is not the pretrained
    configuration's, and would leave the trained head at random init."""
    cfg = json.loads(meta.get("data_cfg", "{}"))
    overlay: dict = {k: tuple(v) for k, v in cfg.items()}
    classes = json.loads(meta.get("timm_kwargs", "{}")).get("num_classes")
    if classes is not None:
        overlay["num_classes"] = classes
    return overlay


def create_timm_from_export(path: str | Path, num_classes: int | None = None, **overrides):
    """Convenience: a timm model of the exported architecture with the exported weights loaded."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    kwargs = {**json.loads(meta["timm_kwargs"]), **overrides}
    overlay = {**data_cfg_overlay(meta), "file": str(path), "custom_load": False}
    if num_classes is not None:  # another class count: timm keeps the file's head only where it is this one
        kwargs["num_classes"] = num_classes
    return timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


FINETUNE_PREFIX = "finetune:"  # a fine-tuning run's model name: finetune:<timm name> (mimkit/eval/finetune.py)


def finetune_checkpoint(path: str | Path) -> tuple[Path, dict] | None:
    """(checkpoint, its contents) when ``path`` is a fine-tuning checkpoint or run folder (a folder: its best.pt,
    else its newest checkpoint); None for anything else (a pretraining checkpoint or run, which the caller reads:
    its saved configuration is peeked at, not loaded twice)."""
    from mimkit.engine import sharded
    from mimkit.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, peek_config

    path = Path(path)
    if not str(peek_config(path).get("model", "")).startswith(FINETUNE_PREFIX):
        return None
    if path.is_dir() and not sharded.is_sharded(path):
        found = [path / "best.pt"] if (path / "best.pt").is_file() else list_checkpoints(path)[-1:]
        if not found:
            raise CheckpointError(f"{path}: a fine-tuning run folder with no best.pt and no checkpoint")
        path = found[0]
    return path, load_checkpoint(path)


def classifier_weights(path: Path, state: dict) -> dict:
    """The timm classifier's state dict of a fine-tuning checkpoint (``finetune_checkpoint``'s): its task's ``net.``
    entries without the prefix, from the file or, for a sharded folder, from its shards."""
    from mimkit.engine import sharded

    weights = sharded.model_state(path) if state.get("format") == "sharded" else state.get("model") or {}
    return {k[len("net.") :]: v for k, v in weights.items() if k.startswith("net.")}


def export_classifier(path: str | Path, state: dict, out: str | Path) -> dict:
    """Write a fine-tuned timm classifier (``finetune_checkpoint``'s checkpoint and contents) as safetensors with
    timm key names, its trained head included; returns the metadata: the timm model name and the options to create
    it (``num_classes`` among them), the class names in label order (``classes``), the input size and normalization
    (``data_cfg``) and the checkpoint's val top-1. ``create_timm_from_export`` loads it."""
    from mimkit.engine.checkpoint import CheckpointError
    from mimkit.eval.finetune import classifier_kwargs

    path = Path(path)
    cfg = state.get("config") or {}
    name = str(cfg.get("model", ""))[len(FINETUNE_PREFIX) :]
    weights = classifier_weights(path, state)
    info = state.get("classifier")
    if info is None:  # written before the checkpoint kept its classifier's options: they are rebuilt
        head = weights.get("head.weight")
        if head is None:
            raise CheckpointError(f"{path}: a fine-tuning checkpoint without 'head.weight'; it cannot be exported")
        chans = {"in_chans": cfg["in_chans"]} if cfg.get("in_chans", 3) != 3 else {}
        kwargs = {**classifier_kwargs(name, chans, cfg.get("img_size")), "num_classes": int(head.shape[0])}
        info = {"timm_model": name, "timm_kwargs": kwargs, "classes": None}
    try:
        net = timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its classifier {info['timm_model']} cannot be built here ({err})") from None
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {info['timm_model']} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    kwargs = info["timm_kwargs"]
    scores = state.get("extra") or {}
    extra = {k: str(scores[k]) for k in ("val_top1", "best_val_top1", "best_epoch") if k in scores}
    if info.get("classes"):
        extra["classes"] = json.dumps(info["classes"])
    built = tuple(getattr(net, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-2:])  # timm's default
    mean, std = (cfg["mean"], cfg["std"]) if cfg.get("mean") and cfg.get("std") else (None, None)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    size = kwargs.get("img_size") or built
    return _write(tensors, out, info["timm_model"], kwargs, kwargs["num_classes"], path, size, mean, std, **extra)
