"""The MAE decoder (mimkit/models/decoder.py): predicting at the masked positions only (the training path) gives the
loss and gradients of predicting everywhere (the evaluation path); the first block's mask-token rows computed once per
position give those of the full sequence."""

import pytest
import torch
from timm.models.vision_transformer import Block

from mimkit.masking import gather_tokens
from mimkit.methods import create_method
from mimkit.models.decoder import DecoderBlock, TransformerDecoder


def test_decoder_block_at_some_tokens_equals_the_whole_block_gathered_in_values_and_gradients():
    torch.manual_seed(0)
    blk = DecoderBlock(32, 4, 2.0, qkv_bias=True)
    assert blk.state_dict().keys() == Block(32, 4, 2.0, qkv_bias=True).state_dict().keys()
    x = torch.randn(3, 11, 32, requires_grad=True)
    ids = torch.stack([torch.randperm(11)[:7] for _ in range(3)])
    got, want = blk(x, ids), gather_tokens(blk(x), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    params = [x, *blk.parameters()]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [False, True], ids=["no-cls", "cls"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("at_masked", [False, True], ids=["everywhere", "at-masked"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_mask_token_rows_equal_decoding_the_full_sequence_in_values_and_gradients(
    cls, depth, at_masked, checkpointing
):
    """``forward`` (mask-token rows once per position in the first block) against ``decode`` of the full sequence
    built the plain way: mask tokens concatenated and unshuffled."""
    torch.manual_seed(0)
    dec = TransformerDecoder(24, (4, 4), 12, dim=32, depth=depth, num_heads=4, cls_token=cls)
    dec.grad_checkpointing = checkpointing
    n, length, visible, prefix = 3, 16, 5, int(cls)
    ids_shuffle = torch.rand(n, length).argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    latent = torch.randn(n, prefix + visible, 24, requires_grad=True)
    at = ids_shuffle[:, visible:] if at_masked else None
    x = dec.embed(latent)
    masks = dec.mask_token.expand(n, length - visible, -1)
    full = torch.cat([x[:, :prefix], gather_tokens(torch.cat([x[:, prefix:], masks], 1), ids_restore)], 1)
    want, got = dec.decode(full, at), dec(latent, ids_shuffle[:, :visible], at)
    assert got.shape == (n, length - visible if at_masked else length, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    params = [latent, *dec.parameters()]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mae_vit_pico_patch8", "umae_swin_pico_128", "umae_vit_pico_patch8"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_predicts_masked_positions_only_with_the_same_loss_and_gradients(name, checkpointing):
    """Train mode (last block and head at the masked positions) against eval mode (every position) on the same
    draw: equal loss and parameter gradients; train mode's pred equals eval's at the masked positions, 0 elsewhere."""
    torch.manual_seed(0)
    model = create_method(name)
    model.set_grad_checkpointing(checkpointing)
    side = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    batch = {"image": torch.randn(2, 3, side, side)}
    results = []
    for training in (True, False):
        model.train(training)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks
        loss, out = model(batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), out["pred"].detach(), out["mask"], grads))
    (l_train, p_train, mask, g_train), (l_eval, p_eval, _, g_eval) = results
    torch.testing.assert_close(l_train, l_eval, atol=1e-6, rtol=1e-5)
    assert g_train.keys() == g_eval.keys() and any(g.abs().sum() > 0 for g in g_train.values())
    for k in g_train:
        torch.testing.assert_close(g_train[k], g_eval[k], atol=1e-6, rtol=1e-4, msg=k)
    masked = mask.bool()
    torch.testing.assert_close(p_train[masked], p_eval[masked], atol=1e-5, rtol=1e-5)
    assert torch.all(p_train[~masked] == 0) and p_eval[~masked].abs().sum() > 0


def test_nothing_masked_scores_zero_in_training_instead_of_an_empty_mean():
    model = create_method("mae_vit_pico_patch8", mask_ratio=0.0).train()
    loss, out = model({"image": torch.randn(2, 3, 64, 64)})
    assert loss.item() == 0.0 and out["mask"].sum() == 0


@pytest.mark.parametrize("n", [3, 1])
def test_spread_equals_scatter_in_values_and_gradients(n):
    """``spread`` (whole rows copied in place into one copy of the common rows) against ``scatter`` into the expanded
    common rows; the common rows themselves stay as they were, also for one sample (where a reshape would be a view
    of them)."""
    from mimkit.models.decoder import spread

    torch.manual_seed(0)
    length, d, g_ = 9, 5, 4
    own = torch.randn(n, g_, d, requires_grad=True)
    common = torch.randn(length, d, requires_grad=True)
    before = common.detach().clone()
    where = torch.stack([torch.randperm(length)[:g_] for _ in range(n)])
    got = spread(own, common, where)
    want = common.expand(n, -1, -1).scatter(1, where.unsqueeze(-1).expand(-1, -1, d), own)
    assert torch.equal(got, want) and torch.equal(common.detach(), before)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (own, common), g), torch.autograd.grad(want, (own, common), g)):
        torch.testing.assert_close(a, b)
