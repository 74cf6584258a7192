"""DyViT's stages 1-3 are confined to a 32 px unit; with unit_context=True their features see other units."""

import timm
import torch


def _stride8_feature_of_unit_00(model, img):
    with torch.no_grad():
        maps = model(img)  # features_only: strides 4, 8, 16, 32
    return maps[1][:, :, :4, :4]  # stride 8: unit (0, 0) is the top-left 4x4 tokens


def test_a_change_two_units_away_reaches_stride_8_and_16_features_only_with_context():
    img = torch.randn(1, 3, 128, 128)
    changed = img.clone()
    changed[:, :, :32, 64:96] += 3.0  # unit (0, 2): two units to the right of unit (0, 0)
    for context in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("dyvit_pico_128", features_only=True, unit_context=context).eval()
        a, b = _stride8_feature_of_unit_00(model, img), _stride8_feature_of_unit_00(model, changed)
        with torch.no_grad():
            s16 = (model(img)[2][:, :, :2, :2] - model(changed)[2][:, :, :2, :2]).abs().max()
        if context:
            assert (a - b).abs().max() > 1e-4 and s16 > 1e-4
        else:
            assert torch.allclose(a, b) and s16 == 0  # confined: nothing crosses a unit before stage 4


def test_visible_units_only_still_encode_without_mask_tokens():
    torch.manual_seed(0)
    model = timm.create_model("dyvit_pico_128", unit_context=True).eval()
    img = torch.randn(2, 3, 128, 128)
    ids = torch.tensor([[0, 5, 10, 15], [3, 6, 9, 12]])
    with torch.no_grad():
        out = model.forward_visible(img, ids)
        other = img.clone()
        other[:, :, 32:64, :32] += 5.0  # unit 4, masked in both images: it is not seen
        again = model.forward_visible(other, ids)
    assert out.shape == (2, 4, model.num_features) and torch.allclose(out, again)
