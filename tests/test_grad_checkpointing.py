"""Activation checkpointing gives the same loss and gradients, and really recomputes the blocks in the backward."""

import pytest
import torch

from mimkit.methods import create_method

MODELS = [
    "mae_vit_pico_patch8",
    "umae_swin_pico_128",
    "simmim_pvt_pico_128",
    "mixmae_swin_pico_128",
    "coma_dyvit_pico_128",
    "lomar_vit_pico_patch8",
    "umae_vit_pico_patch8",
    "simmim_swin_pico_128",
]


def _step(model, images):
    torch.manual_seed(1)  # the same masks (and drop-path draws) in both runs
    loss, _ = model({"image": images, "index": torch.arange(len(images)), "epoch": 0})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _block_calls(model) -> list[int]:
    """Counts forward calls of the encoder's first transformer block."""
    calls = [0]
    first = next(m for n, m in model.encoder.named_modules() if n.endswith("blocks.0"))
    first.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gives_the_same_loss_and_gradients(name):
    torch.manual_seed(0)
    model = create_method(name, drop_path=0.1)
    images = torch.randn(2, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(3))
    calls = _block_calls(model)
    loss_a, grads_a = _step(model, images)
    plain_calls = calls[0]
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    calls[0] = 0
    loss_b, grads_b = _step(model, images)
    assert calls[0] == 2 * plain_calls  # each block ran again in the backward
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_checkpointing_reaches_the_decoder_and_can_be_turned_off():
    model = create_method("mae_vit_pico_patch8")
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.encoder.grad_checkpointing and not model.decoder.grad_checkpointing


def test_timm_api_on_the_exported_pyramid_encoders():
    import timm

    for name in (
        "mimswin_pico_patch4_window16_128",
        "mimpvt_pico_128",
        "dyvit_pico_128",
        "mixswin_pico_patch4_window16_128",
    ):
        net = timm.create_model(name, num_classes=3)
        net.set_grad_checkpointing(True)
        x = torch.randn(1, 3, 128, 128)
        net(x).sum().backward()
        assert all(getattr(m, "grad_checkpointing", True) for m in net.modules())
