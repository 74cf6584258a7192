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
    assert res["n_train"] == 24 and res["n_val"] == 8 and res["classes"] == 2
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
