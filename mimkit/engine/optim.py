"""Optimizer, learning-rate scaling and the per-iteration warm-up + cosine schedule."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def absolute_lr(blr: float, effective_batch: int, base_batch: int, lr: float | None = None) -> float:
    """lr = blr x effective_batch / base_batch (256 for the MAE family, 512 for SimMIM), unless lr is given."""
    return lr if lr is not None else blr * effective_batch / base_batch


def build_optimizer(param_groups: list[dict], lr: float, betas, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=fused)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr``; stepped per update."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
