import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mimkit.masking import gather_tokens, masking_from_noise, num_visible, random_masking

shapes = st.tuples(st.integers(1, 6), st.integers(2, 300), st.floats(0.0, 0.95))


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_random_masking_counts_and_inverse(shape, seed):
    n, length, ratio = shape
    g = torch.Generator().manual_seed(seed)
    draw = random_masking(n, length, ratio, generator=g)
    keep = num_visible(length, ratio)
    assert keep == max(1, int(length * (1 - ratio)))
    assert draw.ids_keep.shape == (n, keep)
    assert torch.all(draw.mask.sum(1) == length - keep)
    # kept indices are exactly the unmasked positions
    for i in range(n):
        assert set(draw.ids_keep[i].tolist()) == set(torch.nonzero(draw.mask[i] == 0).flatten().tolist())
    # ids_restore is a permutation that undoes the shuffle
    perm = torch.argsort(draw.ids_restore, dim=1)
    assert torch.equal(torch.gather(perm, 1, draw.ids_restore), torch.arange(length).expand(n, -1))


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_masking_is_a_pure_function_of_the_generator(shape, seed):
    n, length, ratio = shape
    a = random_masking(n, length, ratio, generator=torch.Generator().manual_seed(seed))
    b = random_masking(n, length, ratio, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masks_differ_per_sample():
    draw = random_masking(8, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in draw.mask}) == 8
    assert draw.ids_keep.shape[1] == 49  # MAE: ViT/16 at 224 keeps 49 of 196


def test_gather_then_unshuffle_is_identity_on_kept_tokens():
    n, length, d = 3, 20, 5
    x = torch.randn(n, length, d)
    draw = masking_from_noise(torch.rand(n, length), 7)
    kept = gather_tokens(x, draw.ids_keep)
    filler = torch.zeros(n, length - 7, d)
    restored = gather_tokens(torch.cat([kept, filler], 1), draw.ids_restore)
    visible = (draw.mask == 0).unsqueeze(-1)
    assert torch.equal(restored * visible, x * visible)


@pytest.mark.parametrize("layout", ["own-rows", "expanded", "slice"])
def test_gather_tokens_equals_torch_gather_in_values_and_gradients(layout):
    """Whole-row ``index_select`` (for one sequence expanded over the batch, a select from that sequence; for a
    non-contiguous slice, ``torch.gather`` itself) against ``torch.gather`` with the index expanded over the
    channels."""
    torch.manual_seed(0)
    n, length, d, k = 4, 13, 6, 5
    src = torch.randn(1 if layout == "expanded" else n, length, 3 * d if layout == "slice" else d, requires_grad=True)
    x = {"own-rows": src, "expanded": src.expand(n, -1, -1), "slice": src[..., d : 2 * d]}[layout]
    ids = torch.stack([torch.randperm(length)[:k] for _ in range(n)])
    got = gather_tokens(x, ids)
    want = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, src, g)[0], torch.autograd.grad(want, src, g)[0])
