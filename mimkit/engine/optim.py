"""Optimizer, learning-rate scaling and the per-iteration warm-up + cosine schedule."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def absolute_lr(blr: float, effective_batch: int, base_batch: int, lr: float | None = None) -> float:
    """lr = blr x effective_batch / base_batch (256 for the MAE family, 512 for SimMIM), unless lr is given."""
    return lr if lr is not None else blr * effective_batch / base_batch


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


def build_optimizer(param_groups: list[dict], lr: float, betas, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, in PyTorch's fused single-kernel form on the devices that have one (the same update; on a 2-core CPU a
    ViT-B MAE step's optimizer takes 120 ms instead of 420 ms, docs/benchmarks.md), else PyTorch's default."""
    fused = True if device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=fused)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    """Linear warm-up from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr``; stepped per update."""
    import logging

    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    # timm warns that a one-step cosine "will have no effect" (a run that is all warm-up); the trainer says it in
    # terms of the run's options instead
    quiet = logging.getLogger("timm.scheduler.cosine_lr")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - warmup_steps),
            lr_min=min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    finally:
        quiet.setLevel(level)


def layer_decay_param_groups(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with layer-wise lr decay (BEiT/MAE fine-tuning): the stem gets decay^(L+1), block i (counted
    across stages for pyramids) decay^(L-i), the head 1. Uses the model's timm ``group_matcher``; the scale is in each
    group's ``lr_scale``, which timm's schedulers apply. No weight decay on 1-D parameters, biases and
    ``model.no_weight_decay()``."""
    from timm.optim import param_groups_layer_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
