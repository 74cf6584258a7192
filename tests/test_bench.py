"""`mimkit bench`'s FLOP and parameter split between the encoder and the rest."""

import pytest
import torch

from mimkit.bench import forward_flops
from mimkit.methods import create_method


def test_encoder_flops_follow_the_visible_tokens_and_params_add_up():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    half = forward_flops(create_method("mae_vit_pico_patch8", mask_ratio=0.5).eval(), images)
    quarter_model = create_method("mae_vit_pico_patch8", mask_ratio=0.75)
    training = forward_flops(quarter_model, images)
    quarter = forward_flops(quarter_model.eval(), images)
    # 64 patches: 1 + 32 tokens against 1 + 16 (linear layers dominate at this width); in evaluation the same decoder
    # blocks, but the embedding (and, counted with the rest, the ViT's kept-patch embedding: a functional linear map,
    # no module call) and the first block's norm and qkv (mask-token rows once per position) grow with the visible
    # patches: 8 % here
    assert half["encoder_gflops"] / quarter["encoder_gflops"] == pytest.approx(33 / 17, rel=0.08)
    assert quarter["decoder_gflops"] < half["decoder_gflops"] < 1.12 * quarter["decoder_gflops"]
    # a training forward runs the decoder's last block and head at the 48 masked positions only
    assert training["encoder_gflops"] == pytest.approx(quarter["encoder_gflops"])
    assert 0.8 * quarter["decoder_gflops"] < training["decoder_gflops"] < 0.98 * quarter["decoder_gflops"]
    model = create_method("umae_swin_pico_128")
    flops = forward_flops(model, torch.randn(2, 3, 128, 128))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    assert flops["encoder_params_m"] + flops["decoder_params_m"] == pytest.approx(total)
    assert flops["encoder_gflops"] > 0 and flops["decoder_gflops"] > 0


def test_rounds_alternate_the_order_and_give_the_median_ratio_with_its_range(monkeypatch):
    import mimkit.bench as bench_module

    calls = []
    rates = {"a": [10.0, 20.0, 10.0], "b": [20.0, 30.0, 10.0]}  # img/s per round: b/a = 2, 1.5, 1

    def fake(name, *args, **kwargs):
        k = sum(1 for c in calls if c == name)
        calls.append(name)
        ips = rates[name][k]
        return {"model": name, "images_per_s": ips, "step_time_s": 1 / ips, "peak_memory_mb": 100.0 + k}

    monkeypatch.setattr(bench_module, "bench_model", fake)
    rows = bench_module.bench(["a", "b"], 4, [None], 1, 0, "fp32", "cpu", rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    a, b = rows
    assert a["speed_vs_first"] == 1.0 and a["speed_vs_first_range"] == [1.0, 1.0]
    assert b["speed_vs_first"] == 1.5 and b["speed_vs_first_range"] == [1.0, 2.0] and b["rounds"] == 3
    assert b["images_per_s"] == 20.0 and b["peak_memory_mb"] == 101.0  # the median round, the median memory
