"""A linear map and an MLP that run their tall, narrow products through oneDNN on the CPU.

The first stages of a pyramid at full resolution (SimMIM, fine-tuning) put tens of thousands of tokens of 64-128
channels through MLPs 4-8x as wide. For those products PyTorch's CPU ``addmm`` first writes the bias into the whole
(wide) output and then accumulates the product onto it, and the weight gradient ``dy^T x`` is slow in that
orientation; oneDNN's linear adds the bias in its own kernel, and ``(x^T dy)^T`` computes the same gradient faster.
On CPU-3 a stage-1 linear of SimMIM PVT-S (32768 rows, 64 -> 512) takes 31 instead of 42 ms forward and backward,
and the whole SimMIM PVT-S step runs 1.06x (1.03-1.06) as fast (docs/benchmarks.md, "Tall, narrow products").
Elsewhere (few rows, or products wide on both sides, as in ViT-B) oneDNN is the slower one, so :func:`linear` takes
this path only for the shapes where it was measured to win (:func:`uses_onednn`) and calls ``F.linear`` otherwise;
the values and gradients are those of ``F.linear`` up to float rounding (tests/test_mlp.py).

Under ``torch.compile`` the same products go through oneDNN as a custom operator (``mimkit::onednn_linear``) that
inductor calls as it is (it has no lowering of its own for oneDNN's unpacked linear), and the GELU after such a product
through ATen's kernels as ``mimkit::gelu``: inductor's generated GELU took 1.5-2x as long as ATen's on CPU-3, forward
and backward, and after an opaque product there is no bias add for inductor to fuse it with (after ``F.linear`` it
fuses bias and GELU into one pass, and keeps its own; docs/benchmarks.md, "Compiled CPU kernels"). Eager steps keep
the ``autograd.Function``: the custom operator, called eagerly, costs 60-100 us more per forward and backward.

``set_cpu_linear("aten")`` (``--cpu-linear aten``) turns both off (``F.linear`` and ``nn.GELU`` everywhere). Neither is
taken under autocast, off the CPU, for other dtypes than float32, for tensor subclasses (FSDP's sharded parameters), or
where PyTorch lacks the operator or it fails a check against ``F.linear`` at import (``mkldnn::_linear_pointwise`` is
internal to PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CPU_LINEAR_CHOICES = ("auto", "aten")
ONEDNN_MIN_ROWS = 8192  # rows (tokens in the batch) from which the tall, narrow products pay on CPU-3
NARROW = 128  # the narrow side, in channels
WIDENING = 4  # out >= WIDENING * in when in <= NARROW (an MLP's first layer)
NARROWING = 8  # in >= NARROWING * out when out <= NARROW (an MLP's second layer, 8x only: 4x measured slower)
BIAS_MV_COLUMNS = 256  # the bias gradient as a matrix-vector product from this many output channels

_mode = {"cpu_linear": "auto"}


def set_cpu_linear(mode: str) -> None:
    """``auto``: tall, narrow CPU products through oneDNN (:func:`uses_onednn`); ``aten``: always ``F.linear``."""
    if mode not in CPU_LINEAR_CHOICES:
        raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEAR_CHOICES)}, got {mode!r}")
    _mode["cpu_linear"] = mode


def cpu_linear() -> str:
    """The current setting of :func:`set_cpu_linear`."""
    return _mode["cpu_linear"]


def uses_onednn(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a product of this shape is one of those measured faster through oneDNN (module docstring)."""
    if rows < ONEDNN_MIN_ROWS:
        return False
    widening = in_features <= NARROW and out_features >= WIDENING * in_features
    narrowing = out_features <= NARROW and in_features >= NARROWING * out_features
    return widening or narrowing


def _onednn_available() -> bool:
    """oneDNN's linear is there and computes ``F.linear`` (an internal operator: checked once on a small product, so
    that a PyTorch whose operator changed falls back to ``F.linear`` instead of failing mid-run)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    cpu = torch.device("cpu")  # no random draw, whatever the default device
    x, w = torch.linspace(-1, 1, 12, device=cpu).view(4, 3), torch.linspace(-0.5, 0.5, 15, device=cpu).view(5, 3)
    b = torch.linspace(0, 1, 5, device=cpu)
    try:
        return bool(torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5))
    except Exception:  # noqa: BLE001  (any failure of the internal operator means: not usable)
        return False


def _cpu_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` may take mimkit's CPU kernel choices: the setting is ``auto``, and ``x`` a plain float32 CPU
    tensor outside autocast."""
    if _mode["cpu_linear"] != "auto" or x.device.type != "cpu" or x.dtype != torch.float32 or type(x) not in _PLAIN:
        return False
    return not torch.is_autocast_enabled("cpu")


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _ONEDNN or not _cpu_kernels(x) or weight.dtype != torch.float32 or x.dim() < 2:
        return False
    if type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    return uses_onednn(x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0])


def _onednn_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


_ONEDNN = _onednn_available()
_PLAIN = (torch.Tensor, nn.Parameter)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN's products forward and for the input gradient, the weight gradient with the narrow
    operand on the left."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return _onednn_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_linear(dy2, weight.t(), None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x2, dy2, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _bias_grad(dy2)
        return dx, dw, db


def _weight_grad(x2: torch.Tensor, dy2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy^T x`` with the narrow operand on the left."""
    out_f, in_f = weight.shape
    return dy2.t() @ x2 if out_f <= in_f else (x2.t() @ dy2).t().contiguous()


def _bias_grad(dy2: torch.Tensor) -> torch.Tensor:
    """Column sums; from 256 columns a matrix-vector product, 1.2-1.6x faster than ``sum(0)`` on CPU-3
    (docs/benchmarks.md, "Row gathers")."""
    return torch.mv(dy2.t(), dy2.new_ones(dy2.shape[0])) if dy2.shape[1] >= BIAS_MV_COLUMNS else dy2.sum(0)


# the compiled path: the same kernels as operators inductor cannot look into (torch.library custom operators)
@torch.library.custom_op("mimkit::onednn_linear", mutates_args=(), device_types="cpu")
def _onednn_linear_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x2, weight, bias)


@_onednn_linear_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty(x2.shape[0], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output):
    x2, weight, bias = inputs
    ctx.save_for_backward(x2, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, dy2):
    x2, weight = ctx.saved_tensors
    dx = _onednn_linear_op(dy2, weight.t(), None) if ctx.needs_input_grad[0] else None
    dw = _weight_grad(x2, dy2, weight) if ctx.needs_input_grad[1] else None
    db = _bias_grad(dy2) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_onednn_linear_op.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


@torch.library.custom_op("mimkit::gelu", mutates_args=(), device_types="cpu")
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu(x)


@_gelu_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("mimkit::gelu_backward", mutates_args=(), device_types="cpu")
def _gelu_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(dy, x)


@_gelu_backward_op.register_fake
def _(dy, x):
    return torch.empty_like(dy)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, dy):
    return _gelu_backward_op(dy, ctx.saved_tensors[0])


_gelu_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oneDNN path whatever the shape (float32 CPU tensors; for measuring it, scripts/cpu_linear.py)."""
    return _OneDNNLinear.apply(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where that was measured faster (module docstring)."""
    if _eligible(x, weight, bias):
        if torch.compiler.is_compiling():
            out = _onednn_linear_op(x.reshape(-1, x.shape[-1]), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's ``Mlp`` without dropout, with its names, so state dicts keep their keys), both
    products through :func:`linear`."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compiled, a GELU after oneDNN's product (an operator inductor cannot fuse into) runs ATen's kernels
        kernels = torch.compiler.is_compiling() and _eligible(x, self.fc1.weight, self.fc1.bias)
        h = linear(x, self.fc1.weight, self.fc1.bias)
        return linear(_gelu_op(h) if kernels else self.act(h), self.fc2.weight, self.fc2.bias)
