"""--compile: a compiled training step gives the eager step's loss and gradients (inductor on CPU, tiny ViT)."""

import pytest
import torch

from mimkit.methods import create_method


@pytest.mark.slow
def test_compiled_mae_step_equals_eager():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8")
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.arange(2)}

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
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
