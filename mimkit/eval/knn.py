"""Weighted cosine k-nearest-neighbour classification on frozen features (k=20, T=0.07; the DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.data import labelled_splits
from mimkit.eval.features import extract_features, features_of_tensors
from mimkit.models._size import ImageSize


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 512,
) -> torch.Tensor:
    """Class scores (Q, C): each of the k most cosine-similar training samples votes exp(sim / T)."""
    train = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k from class scores."""
    out = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        hit = (scores.topk(k_, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_evaluate(
    model,
    data: str,
    img_size: ImageSize,
    mean,
    std,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 0,
    device="cpu",
    pool: str = "avg",
    progress: bool = False,
    decoded: dict | None = None,
    columns: dict | None = None,
) -> dict:
    """Weighted kNN (cosine, temperature-weighted votes of the ``k`` nearest) of ``model``'s features: top-1/5.
    ``decoded``: ``features.decode_labelled(data, img_size, mean, std)``'s tensors, to skip decoding the images.
    ``columns``: an ``hf:`` dataset's image and label columns (``labelled_splits``' image_column, label_column)."""
    if decoded is not None:
        (tr_x, tr_y), (va_x, va_y) = decoded["train"], decoded["val"]
        tr_f = features_of_tensors(model, tr_x, batch_size, device, pool)
        va_f = features_of_tensors(model, va_x, batch_size, device, pool)
        classes = decoded["classes"]
    else:
        train, val = labelled_splits(data, **(columns or {}))
        args = dict(
            img_size=img_size,
            mean=mean,
            std=std,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            pool=pool,
            progress=progress,
        )
        tr_f, tr_y = extract_features(model, train, **args)
        va_f, va_y = extract_features(model, val, **args)
        classes = len(train.classes)
    scores = knn_predict(tr_f, tr_y, va_f, classes, k, temperature)
    return {
        **topk_accuracy(scores, va_y),
        "k": min(k, len(tr_y)),  # the neighbours that voted: all training images where there are fewer than k
        "temperature": temperature,
        "n_train": len(tr_y),
        "n_val": len(va_y),
        "classes": classes,
        "img_size": img_size,
        "pool": pool,
    }
