"""Frozen-encoder feature extraction over a labelled image list."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mimkit.data import ImageDataset, ImageList, collate, eval_transform


@torch.no_grad()
def predict(
    fn,
    images: ImageList,
    img_size: int,
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
    ``in_chans`` channels."""
    ds = ImageDataset(images, eval_transform(img_size, mean, std), min_image_size=1, in_chans=in_chans)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    device_type = torch.device(device).type
    outputs, labels = [], []
    for batch in loader:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(batch["image"].to(device))
        outputs.append(out.float().cpu())
        labels.append(batch["label"])
    return torch.cat(outputs), torch.cat(labels)


def extract_features(
    model,
    images: ImageList,
    img_size: int,
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
    model.eval().to(device)
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
