"""Every registered pretraining model builds on the meta device (as FSDP builds it, mimkit/engine/fsdp.py); the small
ones (<= 5 M parameters, one or more per architecture family) are then built for real and run one forward/backward;
the large ones run it on the meta device (shapes only, no compute)."""

import pytest
import torch

from mimkit.methods import create_method, list_methods

SMALL = 5e6


def _batch(model, n=2, device=None):
    size = model.img_size
    return {"image": torch.randn(n, 3, size, size, device=device), "index": torch.arange(n, device=device), "epoch": 0}


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_model_builds_and_trains_one_step(name):
    with torch.device("meta"):  # a constructor that reads tensor values fails here
        model = create_method(name)
    assert all(p.is_meta for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0 and model.img_size > 0
    assert model.encoder_name and isinstance(model.encoder_args, dict)
    if n_params <= SMALL:
        model = create_method(name)
        torch.manual_seed(0)
        loss, outputs = model(_batch(model))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the encoder"
        # what DistributedDataParallel needs of every step (LoMaR's unused fc_norm stopped torchrun at step 2): every
        # trainable parameter gets a gradient, laid out as the parameter is (DDP compares strides)
        unused = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"trainable parameters outside the loss: {unused}"
        strided = [k for k, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
        assert not strided, f"gradients in another layout than their parameters: {strided}"
        if isinstance(outputs, dict) and "pred" in outputs:
            pred, mask = outputs["pred"], outputs["mask"]
            assert pred.shape[:2] == mask.shape and pred.shape[0] == 2 and torch.isfinite(pred).all()
        feats = model.extract_features(_batch(model)["image"])
        assert feats.shape[0] == 2 and feats.ndim == 2 and torch.isfinite(feats).all()
    else:
        with torch.device("meta"):
            loss, outputs = model(_batch(model, device="meta"))
            assert loss.shape == ()
            loss.backward()
        assert any(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
