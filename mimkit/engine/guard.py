"""The divergence guard: which steps to skip, and when a run has diverged (docs/reliability.md)."""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch


class DivergenceGuard:
    """Skips a step whose loss or gradient is non-finite or whose loss exceeds ``spike_factor`` x the median of the
    last ``window`` accepted losses (once ``min_history`` are known); trips when the parameter norm leaves the finite
    range or exceeds ``param_factor`` x the norm at the last verified checkpoint (or at the start of the run)."""

    def __init__(self, spike_factor: float, param_factor: float, window: int = 100, min_history: int = 20):
        self.spike_factor = spike_factor
        self.param_factor = param_factor
        self.min_history = min_history
        self.losses: deque[float] = deque(maxlen=window)
        self.reference_norm: float | None = None

    def check_step(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must be skipped, or None."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return f"non-finite loss or gradient (loss {loss:.4g}, grad norm {grad_norm:.4g})"
        if self.spike_factor > 0 and len(self.losses) >= self.min_history:
            median = statistics.median(self.losses)
            if median > 0 and loss > self.spike_factor * median:
                return f"loss spike ({loss:.4g} > {self.spike_factor:g} x running median {median:.4g})"
        return None

    def accept(self, loss: float) -> None:
        """Record an applied step's loss in the running window."""
        self.losses.append(loss)

    def check_params(self, norm: float) -> str | None:
        """Why the parameters (after a step) cannot be kept, or None."""
        if not math.isfinite(norm):
            return "the parameters became non-finite"
        if self.param_factor > 0 and self.reference_norm and norm > self.param_factor * self.reference_norm:
            return (
                f"the parameter norm exploded ({norm:.4g} > {self.param_factor:g} x {self.reference_norm:.4g} "
                "at the last checkpoint)"
            )
        return None

    def reset(self, reference_norm: float | None) -> None:
        """Forget the loss window (after a resume or rollback) and set the reference parameter norm."""
        self.losses.clear()
        self.reference_norm = reference_norm


def parameter_norm(params) -> torch.Tensor:
    """L2 norm over all tensors (one device reduction, no host sync)."""
    params = [p.detach() for p in params]
    if not params:
        return torch.zeros(())
    norms = torch._foreach_norm(params) if hasattr(torch, "_foreach_norm") else [p.norm() for p in params]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
