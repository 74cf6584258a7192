"""Every registered pretraining model is built; the small ones (<= 5 M parameters, one or more per architecture
family) run one real forward/backward; the large ViT-family ones run it on the meta device (shapes only, no compute).
Large pyramids (whose construction is not meta-device ready) are built for real but not run: their code paths are the
same as their small siblings'."""

import pytest
import torch

from mimkit.methods import create_method, list_methods

SMALL = 5e6


def _batch(model, n=2, device=None):
    size = model.img_size
    return {"image": torch.randn(n, 3, size, size, device=device), "index": torch.arange(n, device=device), "epoch": 0}


def _build(name):
    """(model, on_meta): meta where the constructor allows it (cheap for the huge ones), else real."""
    try:
        with torch.device("meta"):
            return create_method(name), True
    except NotImplementedError:  # a constructor that computes index buffers from tensor values
        return create_method(name), False


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_model_builds_and_trains_one_step(name):
    model, on_meta = _build(name)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0 and model.img_size > 0
    assert model.encoder_name and isinstance(model.encoder_args, dict)
    if n_params <= SMALL:
        if on_meta:
            model = create_method(name)
        torch.manual_seed(0)
        loss, outputs = model(_batch(model))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the encoder"
        if isinstance(outputs, dict) and "pred" in outputs:
            pred, mask = outputs["pred"], outputs["mask"]
            assert pred.shape[:2] == mask.shape and pred.shape[0] == 2 and torch.isfinite(pred).all()
        feats = model.extract_features(_batch(model)["image"])
        assert feats.shape[0] == 2 and feats.ndim == 2 and torch.isfinite(feats).all()
    elif on_meta:
        with torch.device("meta"):
            loss, outputs = model(_batch(model, device="meta"))
            assert loss.shape == ()
            loss.backward()
        assert any(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
