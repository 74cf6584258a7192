import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from timm.models.beit import gen_relative_position_index

from mimkit.cli import main
from mimkit.masking import gather_tokens, window_offsets, window_patch_ids
from mimkit.methods import create_method
from mimkit.models.rpb_vit import expand_rel_pos_table
from mimkit.patches import patchify

from conftest import cli_finetune, cli_pretrain, exported_twin, fit_fixed_batch, make_folder


def _model(**kw):
    torch.manual_seed(0)
    return create_method("lomar_vit_pico_patch8", **kw)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 9), ratio=st.floats(0.3, 0.9), seqs=st.integers(1, 6))
def test_each_window_masks_round_ratio_k2(k, ratio, seqs):
    n_mask = round(ratio * k * k)
    assume(0 < n_mask < k * k)
    model = create_method("lomar_vit_pico_patch8", img_size=max(64, 8 * k), window_size=k, mask_ratio=ratio)
    mask = model.draw_masks(seqs, "cpu", torch.Generator().manual_seed(1))
    assert mask.shape == (seqs, k * k)
    assert (mask.sum(1) == n_mask).all()


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(4, 12),
    cols=st.integers(4, 12),
    k=st.integers(1, 4),
    nw=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_windows_are_raster_ordered_inside_the_grid_with_distinct_offsets(rows, cols, k, nw, seed):
    r, c = window_offsets(3, (rows, cols), k, nw, generator=torch.Generator().manual_seed(seed))
    ids = window_patch_ids(r, c, (rows, cols), k)
    assert ids.shape == (3, nw, k * k) and ids.min() >= 0 and ids.max() < rows * cols
    grid = ids.view(3, nw, k, k)
    assert (grid[..., 1:] - grid[..., :-1] == 1).all()  # consecutive along a window row
    assert (grid[..., 1:, :] - grid[..., :-1, :] == cols).all()  # one grid row down
    if nw <= min(rows, cols) - k + 1:
        for row_offsets in (r, c):
            assert all(len(set(o.tolist())) == nw for o in row_offsets)


def test_targets_line_up_with_the_window_crops():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    ids = model.draw_windows(2, "cpu", torch.Generator().manual_seed(0))
    got = gather_tokens(patchify(x, 8), ids.flatten(1)).view(2, 4, 16, -1)
    for b in range(2):
        for w in range(4):
            top, left = divmod(int(ids[b, w, 0]), 8)
            crop = x[b : b + 1, :, top * 8 : top * 8 + 32, left * 8 : left * 8 + 32]
            assert torch.equal(got[b, w], patchify(crop, 8)[0])
    # the embedding of the gathered window equals timm's patch embedding of the crop
    emb = model.embed_windows(x, ids).view(2, 4, 16, -1)
    top, left = divmod(int(ids[1, 2, 0]), 8)
    ref = model.encoder.patch_embed(x[1:2, :, top * 8 : top * 8 + 32, left * 8 : left * 8 + 32])
    assert torch.allclose(emb[1, 2], ref[0], atol=1e-5)


def test_per_image_windows_differ_and_batch_modes_share_them():
    ids = _model().draw_windows(8, "cpu", torch.Generator().manual_seed(0))
    assert len({tuple(ids[i, :, 0].tolist()) for i in range(8)}) > 1
    shared = _model(window_sampling="batch").draw_windows(8, "cpu", torch.Generator().manual_seed(0))
    assert (shared == shared[:1]).all()
    ref = _model(window_sampling="reference").draw_windows(8, "cpu", torch.Generator().manual_seed(0))
    assert (ref == ref[:, :1]).all()  # each image: one window, K times
    assert len({int(ref[i, 0, 0]) for i in range(4)}) > 1 and torch.equal(ref[0], ref[4])


def test_attention_never_crosses_windows():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    ids = model.draw_windows(2, "cpu", torch.Generator().manual_seed(3))
    mask = model.draw_masks(8, "cpu", torch.Generator().manual_seed(4))
    pred = model.encode_windows(model.embed_windows(x, ids), mask)
    pred[1].pow(2).sum().backward()  # sequence 1 = image 0, window 1
    region = torch.zeros(64, 64, dtype=torch.bool)
    top, left = divmod(int(ids[0, 1, 0]), 8)
    region[top * 8 : top * 8 + 32, left * 8 : left * 8 + 32] = True
    g = x.grad.abs().sum(1)
    assert g[1].sum() == 0 and g[0][~region].sum() == 0
    assert g[0][region].sum() > 0


def test_relative_position_indices_are_symmetric_and_widening_clips():
    idx = gen_relative_position_index((5, 5))[1:, 1:]
    assert (idx + idx.T == idx[0, 0] + idx[0, 0]).all()  # offset d and -d mirror around the zero offset
    table = torch.randn(7 * 7 + 3, 2)  # window 4: offsets -3..3
    wide = expand_rel_pos_table(table, 6)  # offsets -5..5
    assert wide.shape == (11 * 11 + 3, 2) and torch.equal(wide[-3:], table[-3:])
    old = table[:-3].view(7, 7, 2)
    new = wide[:-3].view(11, 11, 2)
    assert torch.equal(new[2:9, 2:9], old)  # every trained offset kept
    assert torch.equal(new[0, 10], old[0, 6]) and torch.equal(new[5, 0], old[3, 0])  # beyond: clipped
    assert torch.equal(expand_rel_pos_table(wide, 4), table)


def test_loss_trains_only_masked_in_window_patches_and_overfits():
    model = _model(mask_ratio=0.5)
    x = torch.randn(2, 3, 64, 64)
    first, last = fit_fixed_batch(model, {"image": x}, 200, seed=1)
    assert last < 0.3 * first, (first, last)
    _, out = model({"image": x})
    assert out["mask"].shape == (2, 64) and ((out["mask"] == 1) <= (out["outside"] == 0)).all()
    assert (out["hidden"] >= out["mask"]).all()


def test_export_and_finetune_at_a_new_resolution(tmp_path):
    model = _model()
    path = tmp_path / "lomar.safetensors"
    meta, net = exported_twin(model, path)
    assert meta["timm_model"] == "rpbvit_pico_patch8_64"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(
            net.forward_head(net.forward_features(x), pre_logits=True), model.extract_features(x), atol=1e-5
        )
    from mimkit.eval.finetune import build_classifier, load_encoder_source

    state, name, kwargs = load_encoder_source(str(path))
    clf, size = build_classifier(state, name, kwargs, 3, 96, 0.0)
    assert size == 96 and clf(torch.randn(1, 3, 96, 96)).shape == (1, 3)
    table = clf.blocks[0].attn.relative_position_bias_table
    assert table.shape == (23 * 23 + 3, 3)  # 12x12 grid; trained offsets span +-3 (4x4 windows)
    assert torch.equal(table[-3:], model.encoder.blocks[0].attn.relative_position_bias_table[-3:])


def test_bad_window_options_are_clear_errors():
    with pytest.raises(ValueError, match="window_size 9 does not fit"):
        create_method("lomar_vit_pico_patch8", window_size=9)
    with pytest.raises(ValueError, match="window_sampling"):
        create_method("lomar_vit_pico_patch8", window_sampling="grid")
    with pytest.raises(ValueError, match="relative position bias"):
        create_method("lomar_vit_pico_patch8", encoder="vit_pico_patch8_64")


def test_lomar_pretrains_finetunes_and_visualizes_from_the_cli(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=(8, 4))
    run = tmp_path / "run"
    assert cli_pretrain(data, run, "lomar_vit_pico_patch8")["steps"] == 4  # 16 train images / batch 4
    assert main(["knn", str(run), "--data", str(data), "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_val"] == 8
    assert main(["visualize", str(run), "--data", str(data), "--num", "2", "--out", str(tmp_path / "l.png")]) == 0
    capsys.readouterr()
    ft = cli_finetune(data, run, tmp_path / "ft", "--img-size", "64")
    assert ft["model"] == "finetune:rpbvit_pico_patch8_64"


def test_a_run_from_before_the_frozen_fc_norm_resumes(tiny_folder, tmp_path, monkeypatch):
    """Checkpoints written while fc_norm was trainable (and never had a gradient) resume with it frozen: its empty
    optimizer entries are left out, with a warning in the log."""
    from mimkit.methods.lomar import LoMaR
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    init = LoMaR.__init__

    def old_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.encoder.fc_norm.requires_grad_(True)  # as LoMaR was built before

    cfg = dict(model="lomar_vit_pico_patch8", epochs=2, batch_size=4, resume="auto")
    with monkeypatch.context() as m:
        m.setattr(LoMaR, "__init__", old_init)
        assert pretrain(pico_config(tiny_folder, tmp_path / "run", max_steps=2, **cfg))["steps"] == 2
    summary = pretrain(pico_config(tiny_folder, tmp_path / "run", max_steps=4, **cfg))
    assert summary["steps"] == 4 and summary["train_steps_this_run"] == 2
    assert "2 parameter(s) that never had a gradient" in (tmp_path / "run" / "train.log").read_text()
