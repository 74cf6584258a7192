"""Frozen-encoder feature extraction over a labelled image list."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mimkit.data import ImageDataset, ImageList, collate, eval_transform


@torch.no_grad()
def extract_features(model, images: ImageList, img_size: int, mean, std, batch_size: int = 128,
                     num_workers: int = 0, device="cpu", pool: str = "avg", progress: bool = False):
    """(features (N, D) float32, labels (N,)) of center-cropped images through ``model.extract_features``."""
    ds = ImageDataset(images, eval_transform(img_size, mean, std), min_image_size=1)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    model.eval().to(device)
    feats, labels = [], []
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="features", leave=False)
    for batch in loader:
        imgs = batch["image"].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            f = model.extract_features(imgs, pool=pool)
        feats.append(f.float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)
