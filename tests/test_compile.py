"""--compile: a compiled training step gives the eager step's loss and gradients (inductor on CPU): MAE on a tiny ViT
and UM-MAE on a tiny Swin (whose position-bias table once had a data-dependent size that inductor could not take)."""

import pytest
import torch

from mimkit.methods import create_method


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("mae_vit_pico_patch8", 64), ("umae_swin_pico_128", 128)])
def test_compiled_step_equals_eager(name, size):
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = create_method(name)
    batch = {"image": torch.randn(2, 3, size, size), "index": torch.arange(2)}

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks in both modes (fallback_random: inductor draws as eager does)
        loss, _ = fn(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = step(model)
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        compiled_loss, compiled_grads = step(torch.compile(model))
    finally:
        inductor_config.fallback_random = old
        torch._dynamo.reset()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert len(compiled_grads) == len(eager_grads) > 10
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
