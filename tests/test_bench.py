"""`mimkit bench`'s FLOP and parameter split between the encoder and the rest."""

import pytest
import torch

from mimkit.bench import forward_flops
from mimkit.methods import create_method


def test_encoder_flops_follow_the_visible_tokens_and_params_add_up():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    half = forward_flops(create_method("mae_vit_pico_patch8", mask_ratio=0.5), images)
    quarter = forward_flops(create_method("mae_vit_pico_patch8", mask_ratio=0.75), images)
    # 64 patches: 1 + 32 tokens against 1 + 16 (linear layers dominate at this width), same decoder
    assert half["encoder_gflops"] / quarter["encoder_gflops"] == pytest.approx(33 / 17, rel=0.08)
    assert half["decoder_gflops"] == pytest.approx(quarter["decoder_gflops"], rel=0.02)
    model = create_method("umae_swin_pico_128")
    flops = forward_flops(model, torch.randn(2, 3, 128, 128))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    assert flops["encoder_params_m"] + flops["decoder_params_m"] == pytest.approx(total)
    assert flops["encoder_gflops"] > 0 and flops["decoder_gflops"] > 0
