"""Pretraining: builds a registered method (``mimkit models``) as the trainer's task. The engine never sees methods."""

from __future__ import annotations

from typing import cast

from mimkit.config import PretrainConfig
from mimkit.data import ImageDataset, find_images, pretrain_transform
from mimkit.data.shards import ShardDataset, ShardList, find_shards, is_shard_source
from mimkit.engine.trainer import Trainer, run_trainer
from mimkit.errors import ConfigError
from mimkit.methods import create_method, method_options
from mimkit.methods.base import MIMMethod
from mimkit.methods.registry import get_preset


def method_kwargs(cfg: PretrainConfig) -> dict:
    """The method's options from the config: ``model_args`` plus the generic keys that the config names."""
    kwargs = dict(cfg.model_args or {})
    for key in ("img_size", "mask_ratio", "norm_pix_loss"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.drop_path:
        kwargs["drop_path"] = cfg.drop_path
    return kwargs


def check_model(cfg: PretrainConfig) -> None:
    """Before any work: the model exists and takes the options given (one-line ``ConfigError`` otherwise)."""
    try:
        get_preset(cfg.model)
    except ValueError as err:
        raise ConfigError(f"model (--model): {err}") from None
    accepted = method_options(cfg.model)
    for key in method_kwargs(cfg):
        if key not in accepted:
            from mimkit.config import _suggest

            raise ConfigError(
                f"model_args (--model-arg): model '{cfg.model}' has no option '{key}'."
                f"{_suggest(key, accepted)} `mimkit models {cfg.model}` lists them."
            )


def build_pretrain_model(cfg: PretrainConfig) -> MIMMethod:
    return create_method(cfg.model, **method_kwargs(cfg))


class PretrainTrainer(Trainer):
    """Self-supervised pretraining of ``cfg.model`` on the images of ``cfg.data`` (labels ignored)."""

    def __init__(self, cfg: PretrainConfig):
        check_model(cfg)
        super().__init__(cfg)

    def training_images(self):
        if is_shard_source(self.cfg.data):
            return find_shards(self.cfg.data, self.cfg.shard_index)
        return find_images(self.cfg.data)

    def build_task(self) -> MIMMethod:
        model = build_pretrain_model(self.cfg)
        if self.cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def build_dataset(self, images) -> ImageDataset | ShardDataset:
        cfg = self.cfg
        transform = pretrain_transform(cast(int, cfg.img_size), cfg.mean, cfg.std, cfg.crop_scale, hflip=cfg.hflip)
        if isinstance(images, ShardList):
            return ShardDataset(images, transform, cfg.min_image_size, cfg.seed, cfg.shuffle_buffer)
        return ImageDataset(images, transform, cfg.min_image_size, seed=cfg.seed)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pretraining job; returns its summary."""
    return run_trainer(PretrainTrainer(cfg))
