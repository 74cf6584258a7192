"""Shared layers (mimkit/models/layers/): window attention against an explicit softmax, and the call shape that lets
PyTorch use its fused kernels; PVT's and Swin's attention modules against explicit forms of the released q/k/v layout;
strided convolutions as channel-last products; contiguous maps into the blocks' norms; no host synchronisation in any
method's training step (a GPU stall each time)."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mimkit  # noqa: F401
from mimkit.methods import create_method, list_methods
from mimkit.models.layers import bias_rows, patch_linear, window_attention


def explicit_attention(q, k, v, bias):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    "bias_shape",
    [(3, 16, 16), (1, 1, 3, 16, 16), (1, 4, 3, 16, 16), (2, 4, 3, 16, 16), (2, 4, 1, 1, 16)],
    ids=["shared", "shared-5d", "per-window", "per-image", "key-mask"],
)
def test_window_attention_equals_an_explicit_softmax_in_values_and_gradients(bias_shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 16, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(bias_shape, requires_grad=True)
    with torch.no_grad():  # some keys hidden, as the shift and key masks do (never a whole row)
        bias[..., 1::5] = float("-inf")
    grad = torch.randn(2, 4, 3, 16, 8)
    got = window_attention(q, k, v, bias)
    want = explicit_attention(q, k, v, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got, (q, k, v, bias), grad)
    g_want = torch.autograd.grad(want, (q, k, v, bias), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lookup", ["embedding", "index_add"])
@pytest.mark.parametrize("index_shape", [(7, 7), (3, 4, 7, 7)], ids=["shared", "per-image"])
@pytest.mark.parametrize("heads_first_grad", [False, True])
def test_bias_rows_lookups_equal_indexing_in_values_and_gradients(lookup, index_shape, heads_first_grad):
    """The CUDA path (F.embedding) and the CPU path (heads-first gather, index_add_ backward) give the bias and the
    table gradient of plain indexing, duplicates included, whatever the layout of the incoming gradient."""
    torch.manual_seed(0)
    table = torch.randn(13, 3, requires_grad=True)
    index = torch.randint(0, 13, index_shape)
    grad = torch.randn(3, *index_shape).movedim(0, -1) if heads_first_grad else torch.randn(*index_shape, 3)
    got, want = bias_rows(table, index, lookup), bias_rows(table, index, "index")
    assert got.shape == (*index_shape, 3)
    torch.testing.assert_close(want, table[index])
    torch.testing.assert_close(got, want)
    g_got, g_want = (torch.autograd.grad(b, table, grad)[0] for b in (got, want))
    torch.testing.assert_close(g_got, g_want)
    assert g_want.abs().sum() > 0


@pytest.mark.parametrize("kernel,in_dim,out_dim", [(1, 6, 6), (2, 5, 7), (4, 3, 8)])
def test_patch_linear_equals_the_strided_convolution_in_values_and_gradients(kernel, in_dim, out_dim):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_dim, out_dim, kernel, kernel)
    x = torch.randn(2, 4 * kernel, 2 * kernel, in_dim, requires_grad=True)  # NHWC, a non-square map
    got = patch_linear(x, conv)
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert got.shape == (2, 4, 2, out_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (x, conv.weight, conv.bias), grad)
    g_want = torch.autograd.grad(want, (x, conv.weight, conv.bias), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    patch_linear(x, conv).square().sum().backward()
    # the accumulated gradient has the weight's strides exactly (DDP compares them: a 1x1 reduction's was
    # (out, 1, out, out), a warning on every PVT run under torchrun)
    assert conv.weight.grad.stride() == conv.weight.stride()


def heads(t, n):
    """(..., L, n * d) -> (..., n, L, d)."""
    return t.unflatten(-1, (n, -1)).transpose(-3, -2)


def assert_same_values_and_gradients(got, want, inputs):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_pvt_attention_takes_q_from_q_and_k_then_v_from_kv():
    """PVT's spatial-reduction attention against an explicit form with the released layout (keys the first half of
    ``kv``'s output, values the second): the split happens on views, so a swapped or mis-strided split would still
    run, just compute something else."""
    from mimkit.models.pvt import SRAttention

    torch.manual_seed(0)
    attn = SRAttention(dim=16, num_heads=2, sr_ratio=2)
    x = torch.randn(2, 4, 6, 16, requires_grad=True)  # NHWC, a non-square map
    got = attn(x, pool=2)
    q = heads(attn.q(x).flatten(1, 2), 2)
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), 2)
    y = attn.norm(attn.sr(pooled).flatten(2).transpose(1, 2))
    k, v = heads(attn.kv(y)[..., :16], 2), heads(attn.kv(y)[..., 16:], 2)
    want = attn.proj(explicit_attention(q, k, v, 0.0).transpose(1, 2).flatten(2)).view(2, 4, 6, 16)
    assert_same_values_and_gradients(got, want, (x, attn.q.weight, attn.kv.weight, attn.sr.weight))


def test_swin_window_attention_takes_q_k_v_in_thirds_of_qkv():
    """Swin's window attention against an explicit form: q, k and v the first, second and last third of ``qkv``'s
    output (timm's and the released layout), the relative-position bias added to every window's scores."""
    from mimkit.models.layers import window_partition
    from mimkit.models.swin import WindowAttention, WindowLayout

    torch.manual_seed(0)
    attn = WindowAttention(dim=12, num_heads=3)
    layout = WindowLayout(8, 8, window=4, shift=0)
    x = torch.randn(2, 8, 8, 12)
    windows = window_partition(x, 4, 4).requires_grad_()  # (2, 4 windows, 16 tokens, 12)
    got = attn(windows, layout)
    bias = bias_rows(attn.pos_mlp.table(layout.radius, x.device), layout.index).permute(0, 1, 4, 2, 3)
    qkv = attn.qkv(windows)
    q, k, v = (heads(qkv[..., i * 12 : (i + 1) * 12], 3) for i in range(3))
    want = attn.proj(explicit_attention(q, k, v, bias).transpose(-3, -2).flatten(-2))
    assert_same_values_and_gradients(got, want, (windows, attn.qkv.weight, attn.proj.weight))


@pytest.mark.parametrize(
    "conv, message",
    [
        (torch.nn.Conv2d(4, 8, 2, 1), "stride equals its kernel"),
        (torch.nn.Conv2d(4, 8, 2, 2, padding=1), "without padding"),
        (torch.nn.Conv2d(4, 8, 2, 2, dilation=2), "dilation"),
        (torch.nn.Conv2d(4, 8, 2, 2, groups=2), "groups"),
        (torch.nn.Conv2d(4, 8, 3, 3), "does not split into 3x3 patches"),
    ],
)
def test_patch_linear_refuses_a_convolution_it_does_not_compute(conv, message):
    """Overlapping, padded or grouped convolutions, or a map the patches do not tile: an error, not other values."""
    with pytest.raises(ValueError, match=message):
        patch_linear(torch.randn(1, 4, 4, 4), conv)


@pytest.mark.parametrize("name", ["umae_pvt_pico_128", "simmim_pvt_pico_128", "umae_swin_pico_128"])
def test_block_layer_norms_get_contiguous_maps(name):
    """A permuted view carried through a stage's residual stream is copied by every LayerNorm, forward and backward
    (PVT's stem had no norm after its permute); only a stem's own norm may take the convolution's permuted output."""
    torch.manual_seed(0)
    net = create_method(name).train()
    seen: list[bool] = []
    for m in net.encoder.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    net({"image": torch.randn(2, 3, 128, 128)})[0].backward()
    assert len(seen) > 4 and seen[1:].count(False) == 0, seen


def test_bias_rows_rejects_unknown_lookups():
    table = torch.randn(13, 3)
    with pytest.raises(ValueError, match="lookup must be one of"):
        bias_rows(table, torch.zeros(2, dtype=torch.long), "gather")


def test_window_attention_calls_sdpa_in_four_dimensions(monkeypatch):
    """Fused attention kernels take only 4-D inputs; a 5-D call falls back to the unfused math path (on GPU in fp32).
    Whether a fused kernel also takes a bias that needs a gradient depends on the device (CUDA's memory-efficient
    kernel does, CPU's flash kernel does not), so the shapes are checked with the bias detached."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:  # the window attention (the decoder's plain attention has none)
            seen.append((q.dim(), attn_mask.dim(), torch._fused_sdp_choice(q, k, v, attn_mask.detach())))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = create_method("umae_swin_pico_128")
    model({"image": torch.randn(2, 3, 128, 128)})[0].backward()
    assert seen and all(q_dim == 4 and m_dim == 4 for q_dim, m_dim, _ in seen)
    assert all(choice != 0 for *_, choice in seen)  # 0 = the math path


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class HostSyncs(TorchDispatchMode):
    """Counts the ATen calls that read a device value back to the host (a full GPU synchronisation each)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        boolean_index = name in ("index", "index_put_", "_index_put_impl_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if name in SYNC_OPS or boolean_index:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_host_sync_counter_sees_a_sync():
    syncs = HostSyncs()
    with syncs:
        torch.arange(4).sum().item()
        torch.nonzero(torch.arange(4) > 1)
    assert syncs.calls == {"_local_scalar_dense": 1, "nonzero": 1}


@pytest.mark.parametrize("name", [n for n in list_methods() if n.endswith(("_pico_128", "_pico_patch8"))])
def test_training_forward_and_backward_read_nothing_back_to_the_host(name):
    torch.manual_seed(0)
    model = create_method(name)
    size = model.img_size if isinstance(model.img_size, tuple) else (model.img_size, model.img_size)
    batch = {"image": torch.randn(2, model.in_chans, *size), "index": torch.arange(2)}
    syncs = HostSyncs()
    with syncs:
        loss, _ = model(batch)
        loss.backward()
    assert not syncs.calls, f"{name}: host reads in the step: {dict(syncs.calls)}"
