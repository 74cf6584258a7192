"""mimkit/models/layers/mlp.py: the tall, narrow CPU products through oneDNN give F.linear's values and gradients,
are taken only where chosen, and the MLP keeps timm's parameter names."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp

import mimkit  # noqa: F401
from mimkit.models.layers import Mlp, linear, set_cpu_linear
from mimkit.models.layers import mlp as mlp_module
from mimkit.models.layers.mlp import cpu_linear, uses_onednn

needs_onednn = pytest.mark.skipif(not mlp_module._ONEDNN, reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def _restore_setting():
    before = cpu_linear()
    yield
    set_cpu_linear(before)


def _took_onednn(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == "_OneDNNLinearBackward"


@pytest.mark.parametrize(
    "rows, in_f, out_f, want",
    [
        (8192, 64, 512, True),  # an MLP's first layer in stage 1 of PVT-S
        (32768, 512, 64, True),  # its second layer
        (8192, 96, 384, True),  # Swin-T's first layer
        (8192, 384, 96, False),  # 4x narrowing: measured slower
        (4096, 64, 512, False),  # too few rows
        (8192, 256, 1024, False),  # wide on both sides
        (1576, 768, 3072, False),  # ViT-B
    ],
)
def test_uses_onednn_picks_the_tall_narrow_products(rows, in_f, out_f, want):
    assert uses_onednn(rows, in_f, out_f) is want


@needs_onednn
@pytest.mark.parametrize(
    "shape, in_f, out_f, bias, x_grad",
    [
        ((2, 4096), 16, 64, True, True),
        ((8192,), 32, 256, True, True),
        ((2, 64, 64), 256, 32, True, True),
        ((8192,), 16, 64, False, True),
        ((2, 4096), 16, 64, True, False),
        ((2, 64, 64), 256, 32, False, False),
    ],
    ids=[
        "widening",
        "widening-bias-by-mv",
        "narrowing-4d",
        "no-bias",
        "input-without-grad",
        "narrowing-no-bias-no-input-grad",
    ],
)
def test_linear_gives_f_linears_values_and_gradients(shape, in_f, out_f, bias, x_grad):
    torch.manual_seed(0)
    x = torch.randn(*shape, in_f, requires_grad=x_grad)
    w = torch.randn(out_f, in_f, requires_grad=True)
    b = torch.randn(out_f, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    dy = torch.randn(*shape, out_f)
    got = linear(x, w, b)
    assert _took_onednn(got)
    want = F.linear(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, r in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        assert g.shape == r.shape and g.is_contiguous()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


@needs_onednn
def test_linear_takes_f_linear_where_not_chosen():
    w = torch.randn(64, 16, requires_grad=True)
    tall = torch.randn(8192, 16)
    assert _took_onednn(linear(tall, w))
    assert not _took_onednn(linear(torch.randn(4096, 16), w))  # too few rows
    assert not _took_onednn(linear(tall.double(), w.double()))  # not float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _took_onednn(linear(tall, w))
    set_cpu_linear("aten")
    assert not _took_onednn(linear(tall, w))
    set_cpu_linear("auto")
    for mode in (torch.no_grad, torch.inference_mode):  # no graph, the same values
        with mode():
            torch.testing.assert_close(linear(tall, w), F.linear(tall, w), rtol=1e-5, atol=1e-4)


def test_a_changed_internal_operator_turns_the_path_off(monkeypatch):
    def broken(*args):
        raise RuntimeError("schema changed")

    assert mlp_module._onednn_available() is mlp_module._ONEDNN
    monkeypatch.setattr(mlp_module, "_onednn_linear", broken)
    assert mlp_module._onednn_available() is False
    monkeypatch.setattr(mlp_module, "_onednn_linear", lambda x, w, b: torch.zeros(x.shape[0], w.shape[0]))
    assert mlp_module._onednn_available() is False  # wrong values: off too


def test_the_options_offer_the_modes_the_layer_knows():
    from mimkit.config import PretrainConfig
    from mimkit.models.layers.mlp import CPU_LINEAR_CHOICES

    choices = PretrainConfig.__dataclass_fields__["cpu_linear"].metadata["choices"]
    assert list(choices) == list(CPU_LINEAR_CHOICES) and PretrainConfig.cpu_linear == "auto"


def test_set_cpu_linear_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="cpu_linear must be one of auto, aten"):
        set_cpu_linear("mkl")


def test_mlp_loads_timms_state_dict_and_computes_the_same():
    torch.manual_seed(0)
    theirs, ours = TimmMlp(16, 64), Mlp(16, 64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8192, 16)  # tall enough for the oneDNN path
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("method", ["simmim_pvt_pico_128", "simmim_swin_pico_128"])
def test_a_pyramid_training_step_gives_the_same_loss_and_gradients_either_way(method, monkeypatch):
    """A whole SimMIM step at 8 x 128 px, whose stage-1 MLP (8192 rows, 32 -> 128 channels) takes the oneDNN path
    under ``auto``: the same loss and gradients as with ``aten``."""
    from mimkit.methods import create_method

    taken = []
    apply = mlp_module._OneDNNLinear.apply
    monkeypatch.setattr(mlp_module._OneDNNLinear, "apply", lambda *a: taken.append(1) or apply(*a))
    torch.manual_seed(0)
    net = create_method(method).train()
    batch = {"image": torch.randn(8, 3, 128, 128)}
    results = {}
    for mode in ("aten", "auto"):
        set_cpu_linear(mode)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks
        loss = net(batch)[0]
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert taken  # auto took the oneDNN path somewhere
    torch.testing.assert_close(results["auto"][0], results["aten"][0], rtol=1e-5, atol=1e-6)
    assert results["auto"][1].keys() == results["aten"][1].keys()
    for name, want in results["aten"][1].items():
        got = results["auto"][1][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(want.abs().max().item(), 1e-3), msg=name)


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "aten"])
def test_compiled_mlp_keeps_the_cpu_kernels_as_operators_with_eager_values_and_gradients(mode):
    """Under ``torch.compile`` the tall, narrow products and the GELU are mimkit's custom operators (oneDNN's linear,
    ATen's GELU), called as they are, with the eager loss and gradients; ``aten`` leaves both to the compiler. The
    forward and backward graphs are run as traced, their operators recorded (tests/test_compile.py compiles with
    inductor)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = set()

    def record(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    set_cpu_linear(mode)
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(8192, 16, requires_grad=True)
    dy = torch.randn(8192, 16)
    want = mlp.fc2(F.gelu(mlp.fc1(x)))
    g_want = torch.autograd.grad(want, [x, *mlp.parameters()], dy)
    torch._dynamo.reset()
    got = torch.compile(mlp, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)(x)
    g_got = torch.autograd.grad(got, [x, *mlp.parameters()], dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, r in zip(g_got, g_want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
    mine = {"mimkit.onednn_linear.default", "mimkit.gelu.default", "mimkit.gelu_backward.default"}
    assert (seen & mine == mine) if mode == "auto" else not seen & mine, sorted(seen)
