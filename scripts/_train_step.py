"""What the step scripts share (profile_step.py, step_breakdown.py, host_memory_faults.py): a method with its fused
AdamW and random batches, and one training step as ``mimkit pretrain`` takes it (zero_grad, forward under bf16
autocast on CUDA, backward, the update)."""

from __future__ import annotations

import torch

import mimkit  # noqa: F401  (before timm: the torchvision shim)
from mimkit.engine.optim import build_optimizer
from mimkit.methods import create_method


def build(model: str, batch_size: int = 8, img_size=None, device: str = "cpu", batches: int = 1):
    """(method in train mode, its optimizer, ``batches`` random batches), seeded."""
    torch.manual_seed(0)
    dev = torch.device(device)
    net = create_method(model, **({"img_size": img_size} if img_size else {})).train().to(dev)
    opt = build_optimizer(net.param_groups(0.05), 1e-4, net.betas, dev)
    side = net.img_size if isinstance(net.img_size, int) else net.img_size[0]
    data = [{"image": torch.randn(batch_size, net.in_chans, side, side, device=dev)} for _ in range(batches)]
    return net, opt, data


def train_step(net, opt, batch: dict, cpu_bf16: bool = False) -> torch.Tensor:
    """zero_grad, forward (bf16 autocast on CUDA, and on the CPU with ``cpu_bf16``), backward, update; returns the
    loss."""
    dev = batch["image"].device
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" or cpu_bf16):
        loss = net(batch)[0]
    loss.backward()
    opt.step()
    return loss
