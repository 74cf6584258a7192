"""End-to-end classification fine-tuning (DeiT/BEiT style, docs/methods.md 1.6) on the shared trainer.

The encoder comes from a mimkit pretraining checkpoint, a ``mimkit export`` safetensors file, or a registered model at
random init (the baseline); it becomes a timm classifier (global average pooling, new head). Layer-wise lr decay,
drop path, RandAugment, mixup / cutmix, label smoothing and random erasing are timm's implementations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import Mixup, create_transform
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import nn

from mimkit.config import LABEL_COLUMN_HELP, PretrainConfig, opt
from mimkit.data import ImageDataset, labelled_splits
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.optim import layer_decay_param_groups
from mimkit.engine.trainer import Trainer, run_trainer
from mimkit.errors import ConfigError
from mimkit.eval.features import predict
from mimkit.eval.knn import topk_accuracy
from mimkit.export import FINETUNE_PREFIX, classifier_weights, finetune_checkpoint
from mimkit.models._size import ImageSize, canonical, pair, size_text
from mimkit.models.rpb_vit import expand_rel_pos_table, table_window

log = logging.getLogger("mimkit")


def default_layer_decay(timm_name: str) -> float:
    """Per-backbone defaults from the papers: MAE ViT-B 0.65, ViT-L/H 0.75, Swin-T / PVT-S 0.85 (UM-MAE),
    Swin-B 0.8, Swin-L 0.7, LoMaR ViT-B 0.65, MixMAE-B 0.7; 0.75 for mimkit's small CPU models."""
    table = {
        "vit_base": 0.65,
        "rpbvit_base": 0.65,
        "vit_large": 0.75,
        "vit_huge": 0.75,
        "mimswin_tiny": 0.85,
        "mimpvt_small": 0.85,
        "mimswin_base": 0.8,
        "mimswin_large": 0.7,
        "mixswin_base": 0.7,
    }
    return next((v for k, v in table.items() if timm_name.startswith(k)), 0.75)


@dataclass
class FinetuneConfig(PretrainConfig):
    """Every fine-tuning option (the pretraining options plus labels, mixup, layer decay, ...)."""

    hidden_options = (
        "mask_ratio",
        "norm_pix_loss",
        "model_args",
        "crop_scale",
        "hflip",
        "model",
        "recon_every",
        "monitor_data",
        "monitor_every",
        "monitor_image_column",
        "monitor_label_column",
        "shard_index",
        "shuffle_buffer",
        "hf_streaming",
        "viz_bands",
    )
    pretrained: str = opt(
        "",
        "Encoder to fine-tune: a mimkit pretraining or fine-tuning checkpoint or run folder, a `mimkit export` "
        ".safetensors file, or released MAE / timm ViT weights.",
        "model",
    )
    in_chans: int = opt(
        3,
        "Image channels the model takes (default: the --pretrained encoder's, else 3). 3: every image becomes 8-bit "
        "RGB. Any other number: images are read at full bit depth (8/16/32-bit, float; multi-band TIFF through "
        "tifffile) and must have exactly this many channels; others are skipped and counted (docs/data.md).",
        "data",
        min=1,
        max=1024,
    )
    mean: list[float] = opt(
        None,
        "Per-channel normalization mean, one value per channel (default: the --pretrained encoder's from its run or "
        "export, else ImageNet's for 3 channels, computed from the data for any other --in-chans).",
        "data",
    )
    random_init: str = opt(
        "",
        "Instead of --pretrained: a registered pretraining model (`mimkit models`) at random init (the baseline).",
        "model",
    )
    layer_decay: float | None = opt(
        None, "Layer-wise lr decay (default: the backbone's from the papers; 1 = off).", "model", gt=0, max=1
    )
    drop_path: float = opt(0.1, "Stochastic depth rate.", "model", min=0, lt=1)
    smoothing: float = opt(0.1, "Label smoothing.", "augmentation", min=0, lt=1)
    mixup: float = opt(0.8, "Mixup alpha (0 = off).", "augmentation", min=0)
    cutmix: float = opt(1.0, "CutMix alpha (0 = off).", "augmentation", min=0)
    mixup_switch_prob: float = opt(
        0.5, "Probability of CutMix instead of Mixup when both are on.", "augmentation", min=0, max=1
    )
    randaug: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('' = off).", "augmentation")
    reprob: float = opt(0.25, "Random-erasing probability.", "augmentation", min=0, max=1)
    model: str = opt("", "Set automatically from the encoder (finetune:<timm name>).", "model")
    epochs: int = opt(100, "Fine-tuning epochs.", min=1)
    blr: float = opt(5e-4, "Base learning rate: lr = blr x effective_batch / 256.", min=0)
    min_lr: float = opt(1e-6, "Final learning rate of the cosine schedule.", min=0)
    warmup_epochs: float = opt(5, "Linear warm-up epochs.", min=0)
    output: str = opt(
        "runs/finetune", "Output folder: checkpoints (best.pt, rotating last), metrics, config.", "output"
    )
    label_column: str = opt("", f"hf: sources: {LABEL_COLUMN_HELP}.", "data")

    def check_pairs(self) -> None:
        """Exactly one of --pretrained and --random-init; --init only with --random-init; a --pretrained path exists."""
        super().check_pairs()  # --label-column (as --image-column) only with an hf: --data
        if bool(self.pretrained) == bool(self.random_init):
            raise ConfigError(
                "give exactly one of --pretrained (checkpoint, run folder or .safetensors) and --random-init MODEL"
            )
        if self.pretrained and not Path(self.pretrained).expanduser().exists():
            raise ConfigError(f"pretrained (--pretrained) = {self.pretrained!r}: no such file or folder")
        if self.init and not self.random_init:
            raise ConfigError(
                f"init (--init) = {self.init!r}: fine-tuning takes --init with --random-init MODEL (the architecture "
                "the weights are mapped onto); a mimkit run or export goes to --pretrained"
            )
        if self.randaug:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.randaug, {})
            except Exception as err:
                raise ConfigError(
                    f"randaug (--randaug) = {self.randaug!r}: not a timm RandAugment spec ({err}); "
                    "e.g. rand-m9-mstd0.5-inc1, or '' for none"
                ) from None


def source_data(pretrained: str) -> dict:
    """What the encoder at ``pretrained`` was trained on, as far as its files say: ``in_chans`` and the ``mean`` /
    ``std`` it saw its images normalized with, from a run folder's config.yaml, a checkpoint's saved config or a
    ``mimkit export`` file's ``data_cfg``; {} for released weights, or a file this cannot read (the loader reports
    those in its own words), and no ``mean`` / ``std`` from older exports."""
    path = Path(pretrained).expanduser()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            values = json.loads(meta.get("data_cfg", "{}"))
            chans = json.loads(meta.get("timm_kwargs", "{}")).get("in_chans", 3 if "timm_model" in meta else None)
        except Exception:  # missing, damaged or foreign: nothing known from here
            return {}
        values["in_chans"] = chans
    else:
        values = ckpt.peek_config(path)
    out = {"in_chans": values["in_chans"]} if isinstance(values.get("in_chans"), int) else {}
    if values.get("mean") and values.get("std"):
        out.update(mean=list(values["mean"]), std=list(values["std"]))
    return out


def load_encoder_source(pretrained: str = "", random_init: str = "", seed: int = 0, init: str = "", in_chans: int = 3):
    """(encoder state dict, timm model name, timm kwargs) from a checkpoint, an export, a released MAE/timm ViT file,
    or a random-init model of ``in_chans`` channels (with ``init``: public weights mapped onto it,
    ``mimkit/weights.py``)."""
    if pretrained and not _is_mimkit_file(pretrained):
        from mimkit.weights import read_state, released_vit_encoder

        log.info("%s: not a mimkit file; reading it as a released ViT (MAE or timm layout)", pretrained)
        return released_vit_encoder(read_state(pretrained), pretrained)
    if pretrained and str(pretrained).endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(pretrained), "pt") as fh:
                meta = fh.metadata() or {}
            state = {k: v for k, v in load_file(str(pretrained)).items() if not k.startswith("head.")}
        except FileNotFoundError:
            raise ckpt.CheckpointError(f"{pretrained}: no such file") from None
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise ckpt.CheckpointError(f"{pretrained}: not a readable safetensors file ({err})") from None
        if "timm_model" not in meta or "timm_kwargs" not in meta:
            raise ckpt.CheckpointError(
                f"{pretrained}: no mimkit export metadata (timm_model); write it with `mimkit export`"
            )
        kwargs = json.loads(meta["timm_kwargs"])
        kwargs.pop("num_classes", None)  # a fine-tuned classifier's export: its head is replaced by a new one
        return state, meta["timm_model"], kwargs
    tuned = finetune_checkpoint(pretrained) if pretrained else None
    if tuned is not None:  # a fine-tuning run or checkpoint: its encoder (the timm classifier less its head)
        path, saved = tuned
        info = saved.get("classifier") or {}
        if not info:
            raise ckpt.CheckpointError(
                f"{path}: a fine-tuning checkpoint from before they kept their classifier's options; export it "
                "(`mimkit export`) and pass the .safetensors file to --pretrained"
            )
        state = {k: v for k, v in classifier_weights(path, saved).items() if not k.startswith("head.")}
        kwargs = {k: v for k, v in info["timm_kwargs"].items() if k != "num_classes"}
        return state, info["timm_model"], kwargs
    if pretrained:
        from mimkit.loading import load_pretrained

        model, _ = load_pretrained(pretrained)
        return model.export_encoder()
    if random_init:
        from mimkit.loading import random_init as make

        model = make(random_init, seed=seed, **({"in_chans": in_chans} if in_chans != 3 else {}))
        if init:
            from mimkit.weights import load_public_weights

            log.info("%s", load_public_weights(model, init).summary())
        return model.export_encoder()
    raise ConfigError("give --pretrained (checkpoint, run folder or .safetensors) or --random-init MODEL")


def _is_mimkit_file(path: str) -> bool:
    """A run folder, a mimkit checkpoint (a dict with ``model`` and ``config``) or a `mimkit export` file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return True
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), "pt") as fh:
                return "timm_model" in (fh.metadata() or {})
        except Exception:
            return True  # let the export reader report the damage
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return True  # let the checkpoint reader report the damage
    return isinstance(raw, dict) and "config" in raw


class ClassifierTask(nn.Module):
    """A timm classifier as a trainer task: ``forward(batch) -> (loss, {"logits"})`` with mixup in training."""

    lr_base_batch = 256
    betas = (0.9, 0.999)
    default_grad_clip = None

    def __init__(
        self,
        net: Any,  # a timm classifier
        timm_name: str,
        timm_kwargs: dict,
        img_size: ImageSize,
        layer_decay: float,
        mixup: Mixup | None,
        smoothing: float,
    ):
        super().__init__()
        self.net = net
        self.timm_name, self.timm_kwargs, self.img_size = timm_name, timm_kwargs, img_size
        self.layer_decay = layer_decay
        self.mixup = mixup
        self.train_loss: nn.Module
        if mixup is not None:
            self.train_loss = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()

    @property
    def encoder(self) -> nn.Module:
        return self.net

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Layer-wise lr decay groups (timm), no weight decay on 1-D parameters."""
        if self.layer_decay < 1.0:
            return layer_decay_param_groups(self.net, weight_decay, self.layer_decay)
        skip = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else set()
        return param_groups_weight_decay(self.net, weight_decay, no_weight_decay_list=skip)

    def forward(self, batch: dict):
        images, labels = batch["image"], batch["label"]
        if self.training:
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
            logits = self.net(images)
            return self.train_loss(logits, labels), {"logits": logits}
        logits = self.net(images)
        return nn.functional.cross_entropy(logits, labels), {"logits": logits}

    def before_optimizer_step(self) -> None:
        """Nothing to keep before a step."""

    def after_optimizer_step(self) -> None:
        """Nothing to refresh after a step."""

    def describe(self) -> dict:
        """Parameter counts of the classifier."""
        n = sum(p.numel() for p in self.net.parameters())
        return {"encoder_params": n, "total_params": n}


def classifier_kwargs(timm_name: str, timm_kwargs: dict, img_size: ImageSize | None) -> dict:
    """``timm.create_model`` options of the classifier fine-tuned from an encoder ``timm_name(**timm_kwargs)``: its
    image size, and for a ViT the average of the final normed patch tokens as the feature."""
    kwargs = dict(timm_kwargs)
    if img_size:
        kwargs["img_size"] = img_size
    if timm_name.startswith("vit_"):
        kwargs.update(global_pool="avg", fc_norm=False)  # average of the final normed patch tokens
    return kwargs


def build_classifier(
    state: dict, timm_name: str, timm_kwargs: dict, num_classes: int, img_size: ImageSize | None, drop_path: float
) -> tuple[Any, ImageSize]:
    """A timm classifier from exported or released encoder weights (or random init), with a new head."""
    kwargs = classifier_kwargs(timm_name, timm_kwargs, img_size)
    net: Any  # a timm classifier
    try:
        net = timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **kwargs
        )
    except RuntimeError as err:  # timm: "Unknown model"
        raise ckpt.CheckpointError(f"encoder '{timm_name}' named by the weights file cannot be built ({err})") from None
    except ValueError as err:  # the model's own check, e.g. an image size that does not fit a pyramid's windows
        given = f"img_size (--img-size) = {size_text(img_size)}" if img_size else f"encoder '{timm_name}'"
        raise ConfigError(f"{given}: {err}") from None
    state = fit_encoder_state(net, state, timm_kwargs.get("img_size"))
    missing, unexpected = ckpt.load_weights(net, state, Path(timm_name), timm_name, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"encoder weights do not fit {timm_name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for p in net.parameters():
        p.requires_grad_(True)  # e.g. the position embedding, fixed during pretraining, is learned now
    with torch.no_grad():
        nn.init.trunc_normal_(net.get_classifier().weight, std=2e-5)
        nn.init.zeros_(net.get_classifier().bias)
    size = kwargs.get("img_size", timm_kwargs.get("img_size"))  # else the size timm built the model for
    return net, size or canonical(net.pretrained_cfg["input_size"][-2:])


def fit_encoder_state(net: Any, state: dict, old_img_size: ImageSize | None) -> dict:
    """``state``, encoder weights for images of ``old_img_size``, made to fit ``net``, the same timm model built for
    another size: an absolute position embedding resampled bicubically, relative position tables of another window
    widened (or cut) by clipping offsets (``expand_rel_pos_table``, e.g. LoMaR at a new resolution). One rule for
    fine-tuning and for evaluating at another size (mimkit/eval/features.py, ``at_size``)."""
    state = dict(state)
    pos = getattr(net, "pos_embed", None)
    if pos is not None and "pos_embed" in state and state["pos_embed"].shape != pos.shape:
        prefix = net.num_prefix_tokens if isinstance(net, VisionTransformer) else 0
        grid = (
            list(net.patch_embed.grid_size)
            if isinstance(net, VisionTransformer)
            else list(getattr(net, "pos_grid", [int(round((pos.shape[1]) ** 0.5))] * 2))
        )
        patch = net.patch_embed.patch_size[0] if isinstance(net, VisionTransformer) else getattr(net, "patch_size", 0)
        old_grid = [s // patch for s in pair(old_img_size)] if old_img_size and patch else None
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], grid, old_size=old_grid, num_prefix_tokens=prefix
        )
    own = net.state_dict()
    for k, v in state.items():
        if k.endswith("relative_position_bias_table") and k in own and own[k].shape != v.shape:
            state[k] = expand_rel_pos_table(v, table_window(own[k]))
    return state


class FinetuneTrainer(Trainer):
    """The trainer with a classifier task, a labelled dataset and a val evaluation after every epoch."""

    cfg: FinetuneConfig
    build_on_meta = False  # build_task loads the encoder's weights from a file: every rank builds it for real

    def training_images(self):
        """The labelled train split of ``--data``."""
        cfg = self.cfg
        columns = dict(image_column=cfg.image_column, label_column=cfg.label_column)
        self.train_list, self.val_list = labelled_splits(cfg.data, seed=cfg.seed, **columns)
        return self.train_list

    def build_task(self) -> ClassifierTask:
        """The classifier task (encoder weights, head, mixup / label smoothing loss)."""
        cfg = self.cfg
        state, name, kwargs = load_encoder_source(cfg.pretrained, cfg.random_init, cfg.seed, cfg.init, cfg.in_chans)
        if kwargs.get("in_chans", 3) != cfg.in_chans:
            raise ConfigError(
                f"in_chans (--in-chans) = {cfg.in_chans}: the encoder of {cfg.pretrained or cfg.random_init} takes "
                f"{kwargs.get('in_chans', 3)} channel(s); pass --in-chans {kwargs.get('in_chans', 3)}"
            )
        classes = list(self.train_list.classes)
        net, img_size = build_classifier(state, name, kwargs, len(classes), cfg.img_size, cfg.drop_path)
        cfg.model = FINETUNE_PREFIX + name
        # what `mimkit export` needs to write the classifier for timm (mimkit/export.py, export_classifier)
        built = {**classifier_kwargs(name, kwargs, img_size), "num_classes": len(classes)}
        self.classifier_info = {"timm_model": name, "timm_kwargs": built, "classes": classes}
        decay = cfg.layer_decay if cfg.layer_decay is not None else default_layer_decay(name)
        cfg.layer_decay = decay
        mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            if cfg.batch_size % 2:
                raise ConfigError(
                    f"batch_size (--batch-size) = {cfg.batch_size}: mixup / cutmix need an even "
                    "batch; use an even size or --mixup 0 --cutmix 0"
                )
            mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.smoothing,
                num_classes=len(self.train_list.classes),
            )
        if cfg.grad_checkpointing:
            net.set_grad_checkpointing(True)  # timm's API; mimkit's pyramids implement it too
        return ClassifierTask(net, name, kwargs, img_size, decay, mixup, cfg.smoothing)

    def train_state(self, rngs: list) -> dict:
        """The trainer's, plus the classifier's timm name, options and class names (for `mimkit export`)."""
        return {**super().train_state(rngs), "classifier": self.classifier_info}

    def build_dataset(self, images):
        """The train dataset with timm's RandAugment transform."""
        cfg = self.cfg
        if cfg.in_chans != 3:  # RandAugment is defined on RGB images; N-channel tensors get crop, flip, erasing
            from timm.data.random_erasing import RandomErasing
            from torchvision.transforms import Compose

            from mimkit.data.transforms import pretrain_transform

            if cfg.randaug:
                self.log.info("--in-chans %d: RandAugment (RGB only) is not applied", cfg.in_chans)
            steps = pretrain_transform(cfg.img_size, cfg.mean, cfg.std, scale=(0.08, 1.0)).transforms
            if cfg.reprob > 0:
                steps.append(RandomErasing(cfg.reprob, mode="pixel", device="cpu"))
            return ImageDataset(images, Compose(steps), cfg.min_image_size, seed=cfg.seed, in_chans=cfg.in_chans)
        transform = create_transform(
            cfg.img_size,
            is_training=True,
            auto_augment=cfg.randaug or None,
            re_prob=cfg.reprob,
            re_mode="pixel",
            interpolation="bicubic",
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
        return ImageDataset(images, transform, cfg.min_image_size, seed=cfg.seed)

    def after_epoch(self, record) -> None:
        """Evaluate on val, log top-1/top-5 and mark the best epoch."""
        cfg = self.cfg
        assert cfg.img_size is not None  # resolved by the trainer from the model before any data is read
        with self.evaluating():  # every rank, also under FSDP (its blocks gather their weights from all ranks)
            logits, labels = predict(
                self.model.net,
                self.val_list,
                cfg.img_size,
                cfg.mean,
                cfg.std,
                max(64, cfg.batch_size),
                self.num_workers,
                self.dist.device,
                autocast=cfg.precision == "bf16" and self.dist.device.type == "cuda",  # as trained
                in_chans=cfg.in_chans,
            )
        acc = topk_accuracy(logits, labels)
        record({"val_top1": acc["top1"], "val_top5": acc["top5"]})
        self.log.info("epoch %d: val top-1 %.2f%%, top-5 %.2f%%", self.epoch, acc["top1"], acc["top5"])
        best = self.extra_summary.get("best_val_top1", -1.0)
        self.extra_summary.update(val_top1=acc["top1"], val_top5=acc["top5"])
        if acc["top1"] > best:  # every rank evaluates the same weights on the same images: the same decision
            self.extra_summary.update(best_val_top1=acc["top1"], best_epoch=self.epoch)
            self.keep_after_save.append("best.pt")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run fine-tuning with ``cfg``: the trainer's result dict (with the last and best val top-1 in its summary)."""
    return run_trainer(FinetuneTrainer(cfg))
