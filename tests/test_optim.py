import pytest
import timm

from mimkit.engine.optim import layer_decay_param_groups


def _scales(model, decay):
    groups = layer_decay_param_groups(model, 0.05, decay)
    by_param = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "name,blocks", [("vit_pico_patch8_64", 4), ("mimswin_pico_patch4_window16_128", 4), ("mimpvt_pico_128", 4)]
)
def test_layer_decay_scales_per_block(name, blocks):
    import mimkit  # noqa: F401

    d = 0.5
    model = timm.create_model(name, num_classes=3)
    scales = _scales(model, d)
    assert scales["head.weight"] == 1.0
    stem = [v for k, v in scales.items() if k.startswith(("patch_embed", "cls_token", "stages.0.patch_embed"))]
    assert stem and all(v == pytest.approx(d ** (blocks + 1)) for v in stem)
    block_keys = {
        "vit_": "blocks.{i}.mlp.fc1.weight",
        "mims": "stages.{i}.blocks.0.mlp.fc1.weight",
        "mimp": "stages.{i}.blocks.0.mlp.fc1.weight",
    }[name[:4]]
    for i in range(blocks):  # block i (of `blocks`, one per stage for the pyramids) gets d^(blocks - i)
        assert scales[block_keys.format(i=i)] == pytest.approx(d ** (blocks - i)), i


def test_no_weight_decay_on_norms_biases_and_position_embedding():
    import mimkit  # noqa: F401

    model = timm.create_model("mimpvt_pico_128", num_classes=3)
    groups = layer_decay_param_groups(model, 0.05, 0.75)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (p.ndim <= 1 or name == "pos_embed" or name.endswith(".bias")), name


def test_built_optimizer_is_fused_on_cpu_and_makes_the_plain_adamw_update():
    import torch

    from mimkit.engine.optim import build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer([{"params": params, "weight_decay": 0.05}], 1e-2, (0.9, 0.95), torch.device("cpu"))
    plain = torch.optim.AdamW([{"params": twins, "weight_decay": 0.05}], lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, t in zip(params, twins):
        assert not torch.equal(p, t.detach() * 0) and torch.allclose(p, t, atol=1e-6)


def test_a_run_that_is_all_warm_up_is_said_in_its_options_terms(tiny_folder, tmp_path, caplog):
    """timm's "cosine will have no effect" warning is replaced by one naming --warmup-epochs; a run with room for the
    cosine has neither."""
    import logging

    from mimkit.pretraining import pretrain

    from conftest import pico_config

    with caplog.at_level(logging.WARNING):
        pretrain(pico_config(tiny_folder, tmp_path / "short", epochs=1, warmup_epochs=40, max_steps=1))
    text = caplog.text + (tmp_path / "short" / "train.log").read_text()
    assert "--warmup-epochs 40" in text and "never decays" in text and "no effect" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pretrain(pico_config(tiny_folder, tmp_path / "long", epochs=2, warmup_epochs=1, max_steps=1))
    assert "warm-up" not in caplog.text + (tmp_path / "long" / "train.log").read_text()
