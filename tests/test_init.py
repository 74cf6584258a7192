"""Initial weights of the UM-MAE and MixMAE backbones follow the released code's formulas, per layer type:
Xavier-uniform Linear, He-normal (fan-out) convolutions and position-bias MLP, Xavier-uniform stem, LayerNorm (1, 0)."""

import math

import pytest
import timm
import torch
from torch import nn

from mimkit.methods import create_method
from mimkit.models.layers import PositionBiasMLP


def _normalized(tensors_and_stds) -> float:
    return float(torch.cat([(w.detach() / std).flatten() for w, std in tensors_and_stds]).std())


@pytest.mark.parametrize(
    "name", ["mimswin_tiny_patch4_window16_256", "mimpvt_small_256", "mixswin_base_patch4_window14_224"]
)
def test_backbone_init_matches_the_released_formulas(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    stem = model.stem_conv()
    mlp_layers = {id(fc) for m in model.modules() if isinstance(m, PositionBiasMLP) for fc in (m.fc1, m.fc2)}
    linear, conv, mlp = [], [], []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
            if id(m) in mlp_layers:
                mlp.append((m.weight, math.sqrt(2 / m.out_features)))
                continue
            fan_in, fan_out = m.in_features, m.out_features
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound + 1e-6
            linear.append((m.weight, bound / math.sqrt(3)))
        elif isinstance(m, nn.Conv2d) and m is not stem:
            conv.append((m.weight, math.sqrt(2 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))))
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
    assert linear
    assert _normalized(linear) == pytest.approx(1.0, rel=0.03)  # Xavier-uniform, each layer at its scale
    if conv:
        assert _normalized(conv) == pytest.approx(1.0, rel=0.05)  # He-normal by fan-out
    if mlp:
        assert _normalized(mlp) == pytest.approx(1.0, rel=0.1)  # 1x1 convolutions in the released Swin
    fan_in, fan_out = stem.weight[0].numel(), stem.weight.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert stem.weight.abs().max() <= bound + 1e-6 and float(stem.weight.std()) > 0.5 * bound / math.sqrt(3)


def test_ummae_projection_to_the_decoder_is_xavier():
    torch.manual_seed(0)
    model = create_method("umae_swin_tiny_256")
    w = model.to_decoder.weight.detach()
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert torch.count_nonzero(model.to_decoder.bias) == 0
