"""Activation checkpointing, timm's convention: a module that runs blocks has a ``grad_checkpointing`` flag;
``set_grad_checkpointing(model, enable)`` sets every flag below a model (timm ViTs, BEiT, mimkit's stages, decoder)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(blk: nn.Module, x: torch.Tensor, *args, enabled: bool = False) -> torch.Tensor:
    """``blk(x, *args)``; with ``enabled`` (and gradients on) its activations are dropped after the forward and
    recomputed in the backward (same results: the RNG state is replayed)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(blk, x, *args, use_reentrant=False)
    return blk(x, *args)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, *args, enabled: bool = False) -> torch.Tensor:
    """``x = run_block(blk, x, *args)`` for each block."""
    for blk in blocks:
        x = run_block(blk, x, *args, enabled=enabled)
    return x


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Set ``grad_checkpointing`` on every submodule that has the flag; returns how many were set."""
    n = 0
    for m in model.modules():
        if m is not model and hasattr(m, "grad_checkpointing"):
            flagged: Any = m  # a flag of timm's and mimkit's modules alike, not in Module's type
            flagged.grad_checkpointing = enable
            n += 1
    return n
