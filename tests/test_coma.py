import json
import math

import pytest
import timm
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mimkit.cli import main
from mimkit.masking import complementary_pair, cycle_mask, num_masked, random_masking
from mimkit.methods import create_method

from conftest import cli_finetune, cli_pretrain, exported_twin, fit_fixed_batch, make_folder


@settings(max_examples=30, deadline=None)
@given(units=st.integers(2, 200), ratio=st.floats(0.05, 0.95), n=st.integers(1, 5), seed=st.integers(0, 99))
def test_complementary_views_partition_the_units(units, ratio, n, seed):
    a, b = complementary_pair(n, units, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a + b, torch.ones(n, units))
    assert (a.sum(1) == num_masked(units, ratio)).all()


@settings(max_examples=30, deadline=None)
@given(units=st.integers(2, 120), ratio=st.floats(0.1, 0.9), seed=st.integers(0, 99))
def test_cycle_gives_every_unit_the_same_frequency_over_full_cycles(units, ratio, seed):
    m = num_masked(units, ratio)
    assume(0 < m < units)
    visits = units // math.gcd(units, m)
    idx = torch.arange(4) + 10 * seed
    total = sum(cycle_mask(idx, k, units, ratio, seed) for k in range(visits))
    assert torch.equal(total, torch.full((4, units), float(m * visits // units)))  # frequency exactly m / units
    first, second = cycle_mask(idx, 0, units, ratio, seed), cycle_mask(idx, 1, units, ratio, seed)
    assert ((first * second).sum(1) == max(0, 2 * m - units)).all()  # the next visit masks what was visible
    assert torch.equal(first, cycle_mask(idx, 0, units, ratio, seed))  # deterministic per (seed, sample)


def test_frequency_0p6_and_uniformity_vs_random():
    units, iters = 25, 100  # 0.6 * 25 = 15 units: exactly 0.6 over every 5 visits
    idx = torch.zeros(1, dtype=torch.long)
    comp = sum(cycle_mask(idx, k, units, 0.6) for k in range(iters)) / iters
    rand = (
        sum(random_masking(1, units, 0.6, generator=torch.Generator().manual_seed(k)).mask for k in range(iters))
        / iters
    )
    assert torch.allclose(comp, torch.full_like(comp, 0.6))
    assert comp.var() < 1e-12 < rand.var()


def _model(name="coma_dyvit_pico_128", **kw):
    torch.manual_seed(0)
    return create_method(name, **kw)


@pytest.mark.parametrize("teacher", ["copy", "ema"])
def test_teacher_is_one_step_behind_and_gets_no_gradient(teacher):
    """M_{t-1} (paper Fig. 3): after a step, the frozen model holds M_t's parameters from before that update (copy),
    or an average that lags by the same step (ema); it differs from the updated M_t."""
    model = _model(teacher=teacher, teacher_momentum=0.9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen_before = [p.detach().clone() for p in model.teacher.parameters()]
    student = list(model.encoder.parameters()) + list(model.decoder.parameters())
    loss, out = model({"image": torch.randn(2, 3, 128, 128)})
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert "teacher_loss" in out["log"]
    student_before = [p.detach().clone() for p in student]
    model.before_optimizer_step()  # what the trainer calls, in this order
    opt.step()
    model.after_optimizer_step()
    moved = 0
    for t, s_new, s_old, f_old in zip(model.teacher.parameters(), student, student_before, frozen_before):
        expected = s_old if teacher == "copy" else 0.9 * f_old + 0.1 * s_old
        assert torch.allclose(t, expected, atol=1e-6)
        moved += not torch.equal(t, s_new)
    assert moved > 10  # the updated M_t and M_{t-1} differ
    model.train()
    assert not model.teacher.training


def test_dyvit_on_visible_units_equals_the_full_image_there():
    enc = timm.create_model("dyvit_pico_128", num_classes=0).eval()
    x = torch.randn(2, 3, 128, 128)
    ids = torch.tensor([[0, 5, 7, 10, 15], [3, 2, 14, 1, 8]])
    with torch.no_grad():
        _, vis = enc.unit_stages(x, ids)
        _, full = enc.unit_stages(x, None)
    for v, f in zip(vis, full):  # stages 1-3: unit maps of the kept units are identical
        f = f.view(2, 16, *f.shape[1:])
        g = torch.stack([f[b, ids[b]] for b in range(2)]).flatten(0, 1)
        assert torch.allclose(v, g, atol=1e-5)


def test_dm_msa_fusion_weights_sum_to_one():
    enc = timm.create_model("dyvit_pico_128", num_classes=0)
    attn = enc.stages[0].blocks[0].attn
    y = torch.randn(5, 8, 8, 24)
    w = attn.fusion_weights(y)
    assert w.shape == (5, 3) and torch.allclose(w.sum(-1), torch.ones(5)) and (w > 0).all()
    assert not torch.allclose(w[0], w[1])  # input-dependent
    assert attn.windows == (2, 4, 8)


def test_dyvit_api_features_export_and_size_error(tmp_path):
    model = _model()
    meta, net = exported_twin(model, tmp_path / "dy.safetensors")
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(net.forward_features(x), model.encoder.eval().forward_features(x), atol=1e-5)
    feats = timm.create_model("dyvit_pico_128", features_only=True)(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 32), (48, 16, 16), (96, 8, 8), (192, 4, 4)]
    assert timm.create_model("dyvit_tiny_224", features_only=True).feature_info.reduction() == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="multiple of 32"):
        create_method("coma_dyvit_pico_128", img_size=100)


def test_pair_mode_without_teacher_predicts_every_unit_once_and_overfits():
    model = _model("coma_vit_pico_patch8", mask_ratio=0.5, mode="pair")
    x = torch.randn(2, 3, 64, 64)
    _, out = model({"image": x})
    assert torch.equal(out["mask"], torch.ones(2, 64))
    first, last = fit_fixed_batch(model, {"image": x}, 200)
    assert last < 0.5 * first, (first, last)


def test_bad_options():
    with pytest.raises(ValueError, match="teacher_weight needs a teacher"):
        create_method("coma_dyvit_pico_128", teacher_weight=1.0)
    with pytest.raises(ValueError, match="mode"):
        create_method("coma_dyvit_pico_128", mode="grid")
    with pytest.raises(ValueError, match="dyvit"):
        create_method("coma_dyvit_pico_128", encoder="mimswin_pico_patch4_window16_128")


def test_coma_cycle_with_teacher_pretrains_logs_and_finetunes_from_the_cli(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=(8, 4))
    run = tmp_path / "run"
    summary = cli_pretrain(
        data,
        run,
        "coma_dyvit_pico_128",
        "--log-every",
        "1",
        "--model-arg",
        "mode=cycle",
        "--model-arg",
        "teacher=ema",
        epochs=2,
    )
    assert summary["steps"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("teacher_loss" in r for r in records) == 8
    assert main(["visualize", str(run), "--data", str(data), "--num", "2", "--out", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    ft = cli_finetune(data, run, tmp_path / "ft")
    assert ft["model"] == "finetune:dyvit_pico_128"


def test_mask_frequency_figure_and_cli(tmp_path, capsys):
    from PIL import Image

    assert main(["mask-frequency", "--grid", "5", "--iterations", "50", "--out", str(tmp_path / "f.png")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["complementary, cycle"]["std"] < 1e-6 < stats["random (MAE)"]["std"]  # 50 = 10 full cycles of 5
    assert Image.open(tmp_path / "f.png").size[0] > 300


def test_cycle_masks_and_ema_teacher_resume_exactly(tiny_folder, tmp_path, monkeypatch):
    from mimkit.engine.checkpoint import list_checkpoints, load_checkpoint
    from mimkit.methods.coma import CoMA
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    seen = []
    draw = CoMA.draw_views
    monkeypatch.setattr(
        CoMA,
        "draw_views",
        lambda self, batch, n, device: (
            seen.append((batch["epoch"], tuple(batch["index"].tolist()))),
            draw(self, batch, n, device),
        )[1],
    )

    common = dict(
        model="coma_dyvit_pico_128",
        img_size=64,
        epochs=2,
        save_every_minutes=1e9,
        model_args={"mode": "cycle", "teacher": "ema", "teacher_momentum": 0.5},
    )
    full = pretrain(pico_config(tiny_folder, tmp_path / "full", **common))
    assert [e for e, _ in seen] == [0] * 6 + [1] * 6  # the trainer tells the method which visit this is
    assert sorted(i for e, idx in seen if e == 0 for i in idx) == list(range(24))
    pretrain(pico_config(tiny_folder, tmp_path / "split", max_steps=8, **common))  # stops inside epoch 2
    rest = pretrain(pico_config(tiny_folder, tmp_path / "split", resume="auto", **common))
    assert rest["steps"] == full["steps"] == 12 and rest["train_steps_this_run"] == 4
    a, b = (load_checkpoint(list_checkpoints(tmp_path / d)[-1])["model"] for d in ("full", "split"))
    assert any(k.startswith("teacher.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
