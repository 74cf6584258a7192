"""Frozen-encoder feature extraction over a labelled image list."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mimkit.data import ImageDataset, ImageList, collate, eval_transform
from mimkit.errors import DataError
from mimkit.models._size import ImageSize
from mimkit.models.interfaces import global_features

log = logging.getLogger("mimkit")


class EncoderFeatures(nn.Module):
    """A timm encoder without a pretraining method around it (a `mimkit export` file, a fine-tuned classifier,
    released ViT weights: ``mimkit.loading.load_encoder``) as the evaluations see a method: ``extract_features``
    by the same rule (``global_features``), ``in_chans`` and ``img_size``; ``name`` and ``kwargs`` are the timm model
    name and arguments it was built from (``export_encoder``)."""

    def __init__(self, encoder: nn.Module, img_size: ImageSize, in_chans: int = 3, name: str = "", kwargs=None):
        super().__init__()
        self.encoder, self.img_size, self.in_chans = encoder, img_size, in_chans
        self.encoder_name, self.encoder_args = name, dict(kwargs or {})

    @classmethod
    def build(
        cls, state: dict, name: str, kwargs: dict, source, hint: str = "", adapt=None, in_chans: int | None = None
    ) -> EncoderFeatures:
        """The timm model ``name`` built with ``kwargs`` and no head, loaded strictly with ``state`` (its head left
        out; ``adapt(net, state)`` first fits the weights to the model, see ``at_size``). ``source``: the file or
        model the weights come from, named in the errors (one that cannot be built is a CheckpointError);
        ``in_chans``: the images' channels where ``kwargs`` does not say."""
        import timm

        from mimkit.engine.checkpoint import CheckpointError, load_weights
        from mimkit.models._size import canonical

        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        net: Any  # a timm model
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, ValueError) as err:  # timm's "Unknown model", or the model's own size checks
            raise CheckpointError(f"{source}: its encoder '{name}' cannot be built here ({err})") from None
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if adapt is not None:
            state = adapt(net, state)
        load_weights(net, state, Path(source), name, hint=hint)
        size = kwargs.get("img_size") or canonical(net.pretrained_cfg["input_size"][-2:])
        return cls(net, size, in_chans or int(kwargs.get("in_chans", 3)), name, kwargs).eval()

    def export_encoder(self) -> tuple[dict[str, torch.Tensor], str, dict]:
        """(state dict, timm model name, kwargs for ``timm.create_model``), as a pretraining method's."""
        state = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        return state, self.encoder_name, dict(self.encoder_args)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """Global features of full images: (N, D), as a pretraining method's of the same encoder."""
        return global_features(self.encoder, images, pool)


def at_size(model, img_size: ImageSize) -> EncoderFeatures:
    """The encoder of ``model`` (a pretraining method or an ``EncoderFeatures``) rebuilt for images of ``img_size``
    with fine-tuning's rule (``fit_encoder_state`` in mimkit/eval/finetune.py: an absolute position embedding
    resampled bicubically, relative position tables widened by clipping): for an encoder built for one input size (a
    ViT, LoMaR's Beit). A ValueError or RuntimeError where the model cannot be built for that size."""
    from mimkit.eval.finetune import fit_encoder_state

    state, name, kwargs = model.export_encoder()
    if not name:
        raise ValueError("the encoder's timm name is not known")
    old = kwargs.get("img_size")
    resized = EncoderFeatures.build(
        state,
        name,
        {**kwargs, "img_size": img_size},
        name,
        adapt=lambda net, st: fit_encoder_state(net, st, old),
        in_chans=model.in_chans,
    )
    return resized.to(next(model.parameters()).device)


def ready(model, device) -> None:
    """``model`` in eval mode on ``device``: moved only when some parameter is elsewhere (a model sharded with FSDP
    is on its device already, and moving it would put its sharded parameters back in place of the gathered ones)."""
    model.eval()
    dev = torch.device(device)
    if any(p.device.type != dev.type or dev.index not in (None, p.device.index) for p in model.parameters()):
        model.to(dev)


@torch.no_grad()
def predict(
    fn,
    images: ImageList,
    img_size: ImageSize,
    mean,
    std,
    batch_size: int = 128,
    num_workers: int = 0,
    device="cpu",
    autocast: bool = False,
    progress: bool = False,
    desc: str = "features",
    in_chans: int = 3,
):
    """(stacked float32 outputs of ``fn`` on center-cropped images, labels (N,)); images read for a model of
    ``in_chans`` channels. An unreadable image is left out, not replaced (a score counts each image once), with one
    warning for the split; none readable is a DataError."""
    transform = eval_transform(img_size, mean, std)
    ds = ImageDataset(images, transform, min_image_size=1, in_chans=in_chans, replace_bad=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    labels, skipped = [], []

    def images_of(batches):
        for batch in batches:
            skipped.extend(batch["skipped"])
            if len(batch["label"]):
                labels.append(batch["label"])
                yield batch["image"]

    outputs = _apply(fn, images_of(loader), device, autocast)
    if skipped:
        first = f"first: {skipped[0][0]}: {skipped[0][1]}"
        if not labels:
            raise DataError(f"{images.root}: none of its {len(images)} images could be read ({first})")
        log.warning("%s: left out %d unreadable image(s) of %d (%s)", images.root, len(skipped), len(images), first)
    return outputs, torch.cat(labels)


def _apply(fn, batches, device, autocast: bool) -> torch.Tensor:
    """``fn`` on every batch of images moved to ``device`` (under bf16 autocast if asked): the stacked float32
    outputs on the CPU."""
    device_type = torch.device(device).type
    outputs = []
    for x in batches:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
            outputs.append(fn(x.to(device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def decode_labelled(
    data, img_size: ImageSize, mean, std, in_chans: int = 3, num_workers: int = 0, columns: dict | None = None
) -> dict:
    """A labelled root's train and val splits decoded once into float32 tensors (center crop, normalised: exactly
    what ``extract_features`` feeds the model), for evaluating several encoders on one set (``mimkit compare``):
    {"train": (images, labels), "val": (images, labels), "classes": n}. Memory: 4 x C x size^2 bytes per image.
    ``columns``: an ``hf:`` dataset's image and label columns (``labelled_splits``' image_column, label_column)."""
    from mimkit.data import labelled_splits

    train, val = labelled_splits(data, **(columns or {}))
    decoded: dict = {"classes": len(train.classes)}
    for name, images in (("train", train), ("val", val)):
        decoded[name] = predict(lambda x: x, images, img_size, mean, std, num_workers=num_workers, in_chans=in_chans)
    return decoded


@torch.no_grad()
def features_of_tensors(model, images: torch.Tensor, batch_size: int = 128, device="cpu", pool: str = "avg"):
    """``model.extract_features`` of already decoded images (N, C, H, W), in batches (bf16 autocast on GPUs)."""
    ready(model, device)
    cuda = torch.device(device).type == "cuda"
    return _apply(lambda x: model.extract_features(x, pool=pool), images.split(batch_size), device, cuda)


def extract_features(
    model,
    images: ImageList,
    img_size: ImageSize,
    mean,
    std,
    batch_size: int = 128,
    num_workers: int = 0,
    device="cpu",
    pool: str = "avg",
    progress: bool = False,
):
    """(features (N, D) float32, labels (N,)) of center-cropped images through ``model.extract_features``
    (bf16 autocast on GPUs)."""
    ready(model, device)
    return predict(
        lambda x: model.extract_features(x, pool=pool),
        images,
        img_size,
        mean,
        std,
        batch_size,
        num_workers,
        device,
        autocast=torch.device(device).type == "cuda",
        progress=progress,
        in_chans=getattr(model, "in_chans", 3),
    )
