import pytest
import torch

from mimkit.models.pos_embed import sincos_2d
from mimkit.patches import is_patchwise, masked_mse, normalized_target, patchify, unpatchify


@pytest.mark.parametrize("p,h,w", [(16, 224, 224), (8, 64, 96), (4, 32, 32)])
def test_patchify_round_trip(p, h, w):
    x = torch.randn(2, 3, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * 3)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p)), x)


def test_patchify_layout_row_major_then_row_col_channel():
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    patches = patchify(x, 2)
    # patch 1 is the top-right 2x2 block; its first value is pixel (0, 2), channel 0, then channel 1
    assert patches[0, 1, 0] == x[0, 0, 0, 2] and patches[0, 1, 1] == x[0, 1, 0, 2]


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 16)


def test_normalized_target_has_zero_mean_unit_unbiased_var():
    t = normalized_target(torch.randn(4, 10, 48) * 3 + 5)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 10), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(4, 10), atol=1e-4)


@pytest.mark.parametrize("scale", [3.0, 1e-4], ids=["spread", "near-constant"])
def test_normalized_target_equals_the_mean_and_unbiased_var_formula(scale):
    """The layer-norm form against (t - mean) / sqrt(var + eps) written out, also where eps dominates the var
    (there around 0, so that float32 cancellation does not decide the comparison)."""
    x = torch.randn(4, 10, 48) * scale + (5 if scale > 1 else 0)
    want = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(normalized_target(x), want, atol=2e-5, rtol=1e-5)


def test_loss_only_on_masked_patches():
    pred = torch.randn(2, 10, 12, requires_grad=True)
    target = torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    loss = masked_mse(pred, target, mask)
    expected = ((pred[:, :4] - target[:, :4]) ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(pred.grad[:, 4:] == 0) and torch.any(pred.grad[:, :4] != 0)


def test_sincos_embedding_shape_cls_row_and_uniqueness():
    emb = sincos_2d(32, (4, 6), cls_token=True)
    assert emb.shape == (25, 32)
    assert torch.all(emb[0] == 0)
    assert len({tuple(r.tolist()) for r in emb[1:]}) == 24
    # first half encodes the column: two positions in one column share it
    assert torch.allclose(emb[1, :16], emb[1 + 6, :16]) and not torch.allclose(emb[1, 16:], emb[1 + 6, 16:])


@pytest.mark.parametrize(
    "conv,expected",
    [
        (torch.nn.Conv2d(3, 8, 4, 4), True),
        (torch.nn.Conv2d(3, 8, 7, 4, padding=3), False),
        (torch.nn.Conv2d(4, 8, 4, 4, groups=2), False),
        (torch.nn.Conv2d(3, 8, (4, 2), (4, 2)), True),
        (torch.nn.Conv2d(3, 8, 4, 4, padding="valid"), True),
        (torch.nn.Conv2d(3, 8, 4, 4, dilation=2), False),
        (torch.nn.Linear(3, 8), False),
    ],
    ids=["patchwise", "overlapping", "grouped", "not-square", "valid-padding", "dilated", "not-a-conv"],
)
def test_is_patchwise_only_for_one_linear_map_per_patch(conv, expected):
    assert is_patchwise(conv) is expected
