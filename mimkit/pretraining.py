"""Pretraining: builds a registered method (``mimkit models``) as the trainer's task. The engine never sees methods."""

from __future__ import annotations

from typing import cast

import torch

from mimkit.config import PretrainConfig
from mimkit.data import ImageDataset, pretrain_transform
from mimkit.data.decode import BadImage, load_image
from mimkit.data.hf import HFStream, HFStreamDataset, is_hf_source
from mimkit.data.shards import ShardDataset, ShardList, find_shards, is_shard_source
from mimkit.engine.trainer import Trainer, run_trainer
from mimkit.errors import ConfigError, DataError
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
    if cfg.in_chans != 3:
        kwargs["in_chans"] = cfg.in_chans
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
    # the values too (image size against windows and strides, ratios, modes): the method is built on the meta device,
    # which allocates nothing (all presets: 3 s in all on CPU-3), so a bad value stops the run before its output
    # folder, its data index or the dataset statistics are made
    try:
        with torch.device("meta"):
            build_pretrain_model(cfg)
    except ConfigError:
        raise
    except Exception:  # a constructor that cannot run on the meta device is checked when it is built for real
        pass


def build_pretrain_model(cfg: PretrainConfig) -> MIMMethod:
    """The registered method of ``cfg.model`` with the config's options (image size, channels, drop path, ...)."""
    return create_method(cfg.model, **method_kwargs(cfg))


def monitor_columns(cfg: PretrainConfig) -> dict:
    """``labelled_splits``' column arguments for ``--monitor-data`` (an hf: dataset's image and label columns)."""
    return dict(
        image_column=cfg.monitor_image_column,
        label_column=cfg.monitor_label_column,
        flags=("--monitor-image-column", "--monitor-label-column"),
    )


class PretrainTrainer(Trainer):
    """Self-supervised pretraining of ``cfg.model`` on the images of ``cfg.data`` (labels ignored)."""

    def __init__(self, cfg: PretrainConfig):
        check_model(cfg)
        if cfg.monitor_data:  # its labels and splits, before any work (not at the first monitor epoch)
            from mimkit.data import labelled_splits

            try:
                labelled_splits(cfg.monitor_data, seed=cfg.seed, **monitor_columns(cfg))
            except DataError as err:
                raise DataError(f"monitor_data (--monitor-data): {err}") from None
        super().__init__(cfg)

    def training_images(self):
        """The pretraining source of ``--data`` (folder, file list, shards or Hugging Face), indexed once."""
        if is_hf_source(self.cfg.data):
            self.images = self.hf_source()
        elif is_shard_source(self.cfg.data):
            self.images = find_shards(self.cfg.data, self.cfg.shard_index)
        else:
            self.images = self.shared_index()
        return self.images

    def hf_source(self):
        """A Hugging Face dataset; for streaming, rank 0 counts the rows (when the dataset's info does not say) and
        the other ranks take its count."""
        from mimkit.data.hf import hf_images, hf_stream
        from mimkit.engine.distributed import broadcast_object
        from mimkit.errors import DataError

        cfg = self.cfg
        if not cfg.hf_streaming:
            return hf_images(cfg.data, cfg.image_column)
        error, stream = None, None
        if self.dist.is_main:
            try:
                stream = hf_stream(cfg.data, cfg.image_column)
            except DataError as err:
                error = str(err)
        error, count = broadcast_object((error, len(stream) if stream is not None else None))
        if error is not None:
            raise DataError(error)
        return stream if stream is not None else hf_stream(cfg.data, cfg.image_column, count)

    def shared_index(self):
        """Rank 0 scans (or reuses DIR/data-index.npz), then the other ranks read that index."""
        from mimkit.data.index import indexed_images
        from mimkit.engine.distributed import broadcast_object
        from mimkit.errors import DataError

        error, images = None, None
        if self.dist.is_main:
            try:
                images = indexed_images(self.cfg.data, self.out)
            except DataError as err:
                error = str(err)
        error = broadcast_object(error)  # also the barrier: the index is written when rank 0 gets here
        if error is not None:
            raise DataError(error)
        return images if images is not None else indexed_images(self.cfg.data, self.out)

    def after_epoch(self, record) -> None:
        """The kNN monitor (--monitor-data) and the reconstruction grid (--recon-every), on rank 0 (on every rank under
        FSDP, whose forward passes gather weights from all ranks; rank 0 records). Both run under a
        saved-and-restored random state, so that they do not change the training run."""
        cfg = self.cfg
        monitor = bool(cfg.monitor_data) and self.epoch % cfg.monitor_every == 0
        recon = cfg.recon_every > 0 and self.epoch % cfg.recon_every == 0
        if not (self.dist.is_main or self.fsdp) or not (monitor or recon):
            return
        from mimkit.data.dataset import seeded

        with self.evaluating(), seeded(cfg.seed):
            if monitor:
                from mimkit.eval import knn_evaluate

                res = knn_evaluate(
                    self.model,
                    cfg.monitor_data,
                    cast(int, cfg.img_size),
                    cfg.mean,
                    cfg.std,
                    device=self.dist.device,
                    columns=monitor_columns(cfg),
                )
                if self.dist.is_main:
                    record({"monitor_knn_top1": res["top1"], "monitor_knn_top5": res["top5"]})
                self.log.info("epoch %d: kNN top-1 %.2f%% on %s", self.epoch, res["top1"], cfg.monitor_data)
            if recon:
                self.reconstruction_grid()

    def reconstruction_grid(self) -> None:
        """8 fixed images (the same every time) through the model: DIR/recon/epoch-NNNN.png and the loggers."""
        import torch

        from mimkit.data import eval_transform
        from mimkit.viz import save_reconstruction_figure

        cfg = self.cfg
        if not hasattr(self, "recon_images"):
            files = self.images.paths
            step = max(1, len(files) // 8)
            transform = eval_transform(cast(int, cfg.img_size), cfg.mean, cfg.std)
            picked = []
            for f in files[::step]:
                try:
                    picked.append(transform(load_image(f, cfg.min_image_size, cfg.in_chans)))
                except BadImage:
                    continue
                if len(picked) == 8:
                    break
            self.recon_images = torch.stack(picked)
        if not self.dist.is_main:  # under FSDP: take part in the forward passes, draw nothing
            from mimkit.viz import reconstruction_panels

            reconstruction_panels(self.model, self.recon_images.to(self.dist.device), cfg.mean, cfg.std)
            return
        path = self.out / "recon" / f"epoch-{self.epoch:04d}.png"
        try:
            path.parent.mkdir(exist_ok=True)
            save_reconstruction_figure(
                self.model,
                self.recon_images.to(self.dist.device),
                cfg.mean,
                cfg.std,
                path,
                title=f"{cfg.model}, epoch {self.epoch}, step {self.step}",
                bands=cfg.viz_bands,
            )
        except OSError as err:  # a full disk: the figure is not worth the run (its checkpoint decides, exit 5)
            self.log.warning("%s: not written (%s); training goes on", path, err.strerror or err)
            return
        self.rec.image("reconstruction", path, self.step)

    def build_task(self) -> MIMMethod:
        """The method to train (``--init`` weights are loaded later, on fresh runs only)."""
        model = build_pretrain_model(self.cfg)
        if self.cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def initial_weights(self) -> None:
        """--init: public or mimkit weights mapped onto the model; the report goes to the log and DIR."""
        if not self.cfg.init:
            return
        import json

        from mimkit.weights import load_public_weights

        report = load_public_weights(self.model, self.cfg.init)
        self.log.info("%s", report.summary())
        if self.dist.is_main:
            (self.out / "init-report.json").write_text(json.dumps(report.to_dict(), indent=1))

    def build_dataset(self, images) -> ImageDataset | ShardDataset:
        """The decoding, augmenting dataset over ``images`` (skip-and-replace for bad images)."""
        return pretrain_dataset(self.cfg, images)


def pretrain_dataset(cfg: PretrainConfig, images) -> ImageDataset | ShardDataset:
    """The augmented training dataset over ``images`` (a folder/list index, tar shards or a Hugging Face source)."""
    transform = pretrain_transform(cast(int, cfg.img_size), cfg.mean, cfg.std, cfg.crop_scale, hflip=cfg.hflip)
    if isinstance(images, HFStream):
        stream = cast(ShardList, images)  # ShardDataset's plan and resume, over rows instead of tar members
        return HFStreamDataset(stream, transform, cfg.min_image_size, cfg.seed, cfg.shuffle_buffer, cfg.in_chans)
    if isinstance(images, ShardList):
        return ShardDataset(images, transform, cfg.min_image_size, cfg.seed, cfg.shuffle_buffer, cfg.in_chans)
    return ImageDataset(images, transform, cfg.min_image_size, seed=cfg.seed, in_chans=cfg.in_chans)


def source_images(
    data: str, image_column: str = "", shard_index: str = "", hf_streaming: bool = False, split: str = "train"
):
    """The images of a ``--data`` source in one process (no shared index), for benchmarks and tools: a folder tree,
    a file list or an ImageFolder ``split`` (files), tar shards, or an ``hf:`` dataset (map-style or streamed)."""
    from mimkit.data import find_images
    from mimkit.data.hf import hf_images, hf_stream

    if is_hf_source(data):
        return hf_stream(data, image_column) if hf_streaming else hf_images(data, image_column)
    if is_shard_source(data):
        return find_shards(data, shard_index)
    return find_images(data, split=split)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pretraining job; returns its summary."""
    return run_trainer(PretrainTrainer(cfg))
