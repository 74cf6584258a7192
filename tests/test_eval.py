import torch

from mimkit.eval import knn_evaluate, knn_predict, topk_accuracy
from mimkit.methods import create_method


def test_knn_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    train_y = torch.arange(4).repeat_interleave(25)
    train = centers[train_y] + torch.randn(100, 16, generator=g)
    val_y = torch.arange(4).repeat_interleave(5)
    val = centers[val_y] + torch.randn(20, 16, generator=g)
    scores = knn_predict(train, train_y, val, num_classes=4, k=20, temperature=0.07, chunk=7)
    acc = topk_accuracy(scores, val_y)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0


def test_knn_votes_are_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # two neighbours of class 1 outvote one closer neighbour at a high temperature, not at a low one
    assert knn_predict(train, labels, query, 2, k=3, temperature=10.0).argmax() == 1
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).argmax() == 0


def test_knn_evaluate_end_to_end(tiny_folder):
    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8", img_size=32)
    res = knn_evaluate(model, str(tiny_folder), 32, [0.5] * 3, [0.25] * 3, k=5)
    assert res["n_train"] == 24 and res["n_val"] == 8 and res["classes"] == 2 and res["k"] == 5
    # more neighbours asked for than there are training images: all of them vote, and the result says so
    assert knn_evaluate(model, str(tiny_folder), 32, [0.5] * 3, [0.25] * 3, k=200)["k"] == 24
    assert res["top1"] >= 75.0  # colour classes are separable even by random features


def test_linear_probe_learns_and_leaves_the_encoder_untouched(tiny_folder):
    from mimkit.eval import linear_probe

    torch.manual_seed(0)
    model = create_method("mae_vit_pico_patch8", img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = linear_probe(
        model, str(tiny_folder), 32, [0.5] * 3, [0.25] * 3, epochs=30, batch_size=8, blr=1.0, warmup_epochs=2
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res["top1"] >= 87.5 and len(res["history"]) == 30  # two colour classes: separable by a linear head
    res = linear_probe(
        model,
        str(tiny_folder),
        32,
        [0.5] * 3,
        [0.25] * 3,
        epochs=10,
        batch_size=8,
        blr=1.0,
        warmup_epochs=2,
        cache=False,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res["cache"] is False and res["top1"] >= 75.0 and len(res["history"]) == 10


def test_predict_keeps_no_autograd_graph(tiny_folder):
    """Evaluation outputs carry no graph (a val pass once ran with gradients on: memory for every activation)."""
    from mimkit.data import labelled_splits
    from mimkit.eval.features import predict

    conv = torch.nn.Conv2d(3, 4, 8, 8)
    out, labels = predict(
        lambda x: conv(x).mean(dim=(2, 3)), labelled_splits(tiny_folder)[1], 32, [0.5] * 3, [0.25] * 3
    )
    assert out.shape == (len(labels), 4) and not out.requires_grad


def test_evaluations_leave_out_unreadable_images(tmp_path, capsys, caplog):
    """A damaged image in val/ was replaced by another val image, which was then scored twice (and train/ got a
    duplicate): kNN, linear probe (and fine-tuning's val: the same predict) leave it out, say so once, and score as
    without it; a split of none readable is a one-line error."""
    import json
    import shutil

    from mimkit.cli import main

    from conftest import make_folder

    clean = make_folder(tmp_path / "clean")
    damaged = tmp_path / "damaged"
    shutil.copytree(clean, damaged)
    (damaged / "val" / "red" / "zz-bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (damaged / "train" / "blue" / "zz-bad.jpg").write_bytes(b"")
    base = ["--random-init", "mae_vit_pico_patch8", "--img-size", "32", "--json"]

    def run(*argv):
        assert main([*argv, *base]) == 0
        return json.loads(capsys.readouterr().out)

    for command in (["knn", "--k", "3"], ["linprobe", "--epochs", "2"]):
        want = run(*command, "--data", str(clean))
        with caplog.at_level("WARNING", logger="mimkit"):
            got = run(*command, "--data", str(damaged))
        assert got["n_val"] == want["n_val"] == 8 and got["n_train"] == want["n_train"] == 24
        assert got["top1"] == want["top1"]
        left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert len(left_out) == 2 and all("left out 1 unreadable image(s)" in m for m in left_out), left_out
        caplog.clear()
    for path in (damaged / "val").rglob("*.jpg"):
        path.write_bytes(b"")
    assert main(["knn", "--data", str(damaged), *base]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the train split's warning
    assert last.startswith("error: ") and "none of its 9 images could be read" in last and "Traceback" not in err


def test_an_encoder_built_for_one_size_is_rebuilt_for_another_by_fine_tunings_rule():
    """knn / linprobe --img-size of a ViT was a one-line refusal (its position embedding is fixed). at_size rebuilds
    the encoder for the new size: at its own size the features are the method's, exactly; at another, a ViT's are
    those of timm's own resampling of the position embedding, and LoMaR's Beit gets its bias tables widened."""
    import copy
    import warnings

    from mimkit.eval.features import EncoderFeatures, at_size
    from mimkit.models.interfaces import global_features

    torch.manual_seed(0)
    mae = create_method("mae_vit_pico_patch8", img_size=32)
    with torch.no_grad():
        mae.encoder.pos_embed.add_(torch.randn_like(mae.encoder.pos_embed))  # not sin-cos: resampling must matter
    x32, x48 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)
    assert torch.allclose(at_size(mae, 32).extract_features(x32), mae.extract_features(x32), atol=1e-6)
    resized = at_size(mae, 48)
    assert isinstance(resized, EncoderFeatures) and resized.img_size == 48
    timm_own = copy.deepcopy(mae.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_own.set_input_size(img_size=(48, 48))
    with torch.no_grad():
        expected = global_features(timm_own.eval(), x48)
    assert torch.allclose(resized.extract_features(x48), expected, atol=1e-5)
    assert not torch.allclose(at_size(resized, 32).extract_features(x32), torch.zeros(2, 96))

    lomar = create_method("lomar_vit_pico_patch8")  # 64 px, windows of 4x4 patches; whole image 8x8
    x64 = torch.randn(2, 3, 64, 64)
    assert torch.allclose(at_size(lomar, 64).extract_features(x64), lomar.extract_features(x64), atol=1e-5)
    wide = at_size(lomar, 96)
    table = wide.encoder.blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == (2 * 12 - 1) ** 2 + 3  # a 12x12 grid
    assert wide.extract_features(torch.randn(2, 3, 96, 96)).shape == (2, lomar.full_encoder().embed_dim)
