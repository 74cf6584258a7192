"""What the trainer asks of the thing it trains: pretraining methods and the fine-tuning classifier both fit it."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    """A trainable task. ``forward(batch) -> (loss, outputs)``; ``outputs["log"]`` (scalar tensors, optional) is
    averaged into the metrics. The class attributes carry the optimizer conventions of the task's paper, so the
    trainer never asks what it trains."""

    lr_base_batch: int  # lr = blr x effective batch / lr_base_batch
    betas: tuple[float, float]  # AdamW betas
    default_grad_clip: float | None  # gradient-norm clip unless --grad-clip is given
    img_size: Any  # the input resolution the task was built for

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]: ...

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups (weight decay, optional per-group ``lr_scale``)."""
        ...

    def before_optimizer_step(self) -> None:
        """Called right before every applied optimizer step (e.g. to keep the parameters of the step before)."""
        ...

    def after_optimizer_step(self) -> None:
        """Called after every applied optimizer step (e.g. to refresh a frozen or EMA model)."""
        ...

    def describe(self) -> dict:
        """At least ``encoder_params`` and ``total_params``."""
        ...
