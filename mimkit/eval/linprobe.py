"""Linear probe (MAE protocol): frozen encoder, BatchNorm without affine + Linear head, LARS, cosine schedule.

With ``cache=True`` (default) the features of center-cropped images are computed once and the head trains on them,
which makes probing on a CPU quick. With ``cache=False`` every epoch passes augmented images (RandomResizedCrop +
flip, as MAE's linear probe) through the frozen encoder.
"""

from __future__ import annotations

import torch
from timm.optim import Lars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mimkit.data import ImageDataset, collate, labelled_splits
from mimkit.data.transforms import pretrain_transform
from mimkit.engine.optim import build_scheduler
from mimkit.eval.features import extract_features, ready
from mimkit.eval.knn import topk_accuracy


class ProbeHead(nn.Module):
    """BatchNorm without affine parameters, then a linear classifier (MAE's linear probe head)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.bn(x))


def linear_probe(
    model,
    data: str,
    img_size: int,
    mean,
    std,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    warmup_epochs: int = 10,
    cache: bool = True,
    pool: str = "avg",
    num_workers: int = 0,
    device="cpu",
    seed: int = 0,
    progress: bool = False,
    columns: dict | None = None,
) -> dict:
    """Train a linear classifier on frozen (optionally cached) features of ``data``'s train split; top-1 on val.
    ``columns``: an ``hf:`` dataset's image and label columns (``labelled_splits``' image_column, label_column)."""
    torch.manual_seed(seed)
    device = torch.device(device)
    train, val = labelled_splits(data, **(columns or {}))
    ready(model, device)  # moved only where it is elsewhere (as every evaluation: mimkit/eval/features.py)
    for p in model.parameters():
        p.requires_grad_(False)
    feat_args = dict(
        img_size=img_size,
        mean=mean,
        std=std,
        batch_size=128,
        num_workers=num_workers,
        device=device,
        pool=pool,
        progress=progress,
    )
    va_f, va_y = extract_features(model, val, **feat_args)
    if cache:
        tr_f, tr_y = extract_features(model, train, **feat_args)
        loader = DataLoader(
            TensorDataset(tr_f, tr_y),
            batch_size=min(batch_size, len(tr_y)),
            shuffle=True,
            drop_last=len(tr_y) > batch_size,
        )
    else:
        ds = ImageDataset(
            train,
            pretrain_transform(img_size, mean, std, scale=(0.08, 1.0)),
            min_image_size=1,
            in_chans=getattr(model, "in_chans", 3),
        )
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=len(ds) > batch_size,
        )
    head = ProbeHead(va_f.shape[1], len(train.classes)).to(device)
    lr = blr * batch_size / 256
    opt = Lars(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = build_scheduler(opt, epochs * len(loader), warmup_epochs * len(loader), min_lr=0.0)
    step, history = 0, []
    for epoch in range(epochs):
        head.train()
        for batch in loader:
            if cache:
                x, y = batch
            else:
                with torch.no_grad():
                    x = model.extract_features(batch["image"].to(device), pool=pool).float()
                y = batch["label"]
            scheduler.step_update(step)
            loss = nn.functional.cross_entropy(head(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            acc = topk_accuracy(head(va_f.to(device)).cpu(), va_y)
        history.append({"epoch": epoch + 1, "loss": loss.item(), **acc})
    best = max(history, key=lambda h: h["top1"])
    return {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "cache": cache,
        "n_train": len(tr_y) if cache else len(train),  # cached: the readable ones (training replaces a bad one)
        "n_val": len(va_y),
        "classes": len(train.classes),
        "img_size": img_size,
        "history": history,
        "head": head.state_dict(),
    }
