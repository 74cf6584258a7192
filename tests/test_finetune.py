import json

import pytest
import torch
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.eval.finetune import FinetuneConfig, default_layer_decay, finetune

from conftest import cli_finetune, cli_pretrain, make_folder

COMMON = dict(
    img_size=32,
    batch_size=8,
    warmup_epochs=1,
    precision="fp32",
    num_workers=0,
    progress=False,
    tensorboard=False,
    log_every=1,
    mixup=0.0,
    cutmix=0.0,
    randaug="",
    reprob=0.0,
    blr=2e-2,
    drop_path=0.0,
    resume="none",
)


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("easy"), per_class=(16, 8), seed=3)


def test_finetuning_raises_val_accuracy(easy, tmp_path):
    control = finetune(
        FinetuneConfig(
            data=str(easy),
            output=str(tmp_path / "lr0"),
            random_init="mae_vit_pico_patch8",
            epochs=2,
            **{**COMMON, "blr": 0.0, "min_lr": 0.0},
        )
    )
    res = finetune(
        FinetuneConfig(
            data=str(easy), output=str(tmp_path / "ft"), random_init="mae_vit_pico_patch8", epochs=6, **COMMON
        )
    )
    assert res["epochs_done"] == 6 and res["best_val_top1"] >= 87.5
    assert res["val_top1"] > control["val_top1"]  # the untrained (lr 0) head is at chance level
    assert (tmp_path / "ft" / "best.pt").is_file()
    state = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert state["epoch"] == res["best_epoch"] and state["extra"]["best_val_top1"] == res["best_val_top1"]
    assert state["model"]["net.head.weight"].shape[0] == 2 and not any(k.startswith("encoder.") for k in state["model"])
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_top1" in r for r in records) == 6


def test_finetune_from_pretraining_checkpoint_and_export_at_a_new_resolution(easy, tmp_path, capsys):
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    pretrain(pico_config(easy, tmp_path / "pre", model="umae_swin_pico_128", img_size=128, epochs=1))
    res = finetune(
        FinetuneConfig(
            data=str(easy),
            output=str(tmp_path / "ft_swin"),
            pretrained=str(tmp_path / "pre"),
            epochs=1,
            **{**COMMON, "img_size": 64},
        )
    )
    assert res["model"] == "finetune:mimswin_pico_patch4_window16_128" and res["epochs_done"] == 1
    assert main(["export", str(tmp_path / "pre"), "--out", str(tmp_path / "enc.safetensors")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "finetune",
                "--data",
                str(easy),
                "--pretrained",
                str(tmp_path / "enc.safetensors"),
                "--epochs",
                "1",
                "--img-size",
                "128",
                "--batch-size",
                "8",
                "--precision",
                "fp32",
                "--num-workers",
                "0",
                "--output",
                str(tmp_path / "ft_export"),
                "--no-progress",
                "--mixup",
                "0",
                "--cutmix",
                "0",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["epochs_done"] == 1


def test_finetune_resume_continues(easy, tmp_path):
    out = tmp_path / "ft"
    finetune(FinetuneConfig(data=str(easy), output=str(out), random_init="mae_vit_pico_patch8", epochs=2, **COMMON))
    res = finetune(
        FinetuneConfig(
            data=str(easy), output=str(out), random_init="mae_vit_pico_patch8", epochs=3, **{**COMMON, "resume": "auto"}
        )
    )
    assert res["epochs_done"] == 3 and res["train_steps_this_run"] == 4  # 32 images / 8 = 4 steps per epoch
    assert "best_val_top1" in res


def test_layer_decay_defaults_and_mixup_path(easy, tmp_path):
    assert default_layer_decay("vit_base_patch16_224") == 0.65
    assert default_layer_decay("mimswin_tiny_patch4_window16_256") == 0.85
    assert default_layer_decay("mimpvt_small_256") == 0.85
    res = finetune(
        FinetuneConfig(
            data=str(easy),
            output=str(tmp_path),
            random_init="mae_vit_pico_patch8",
            epochs=1,
            **{**COMMON, "mixup": 0.8, "cutmix": 1.0, "randaug": "rand-m9-mstd0.5-inc1", "reprob": 0.25},
        )
    )
    assert torch.isfinite(torch.tensor(res["final_loss"]))


def test_finetune_help_hides_pretraining_only_options(capsys):
    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--layer-decay" in text and "--mixup" in text and "--pretrained" in text
    assert "--mask-ratio" not in text and "--norm-pix-loss" not in text


def test_finetune_takes_the_pretraining_runs_normalization_unless_told(tiny_folder, tmp_path):
    """A run pretrained with its own mean/std is fine-tuned with them (from the run folder, a checkpoint file or an
    export); --mean/--std given on the command line win; released weights keep ImageNet's."""
    import yaml

    from mimkit.cli import main

    run = tmp_path / "run"
    cli_pretrain(tiny_folder, run, "mae_vit_pico_patch8", "--img-size", "32", "--mean", "0.4", "0.5", "0.6",
                 "--std", "0.2", "0.2", "0.2")  # fmt: skip
    assert main(["export", str(run), "--out", str(tmp_path / "e.safetensors")]) == 0
    sources = {"folder": run, "file": next(run.glob("checkpoint-*.pt")), "export": tmp_path / "e.safetensors"}
    for name, source in sources.items():
        cli_finetune(tiny_folder, source, tmp_path / f"ft-{name}", "--img-size", "32", "--max-steps", "1")
        saved = yaml.safe_load((tmp_path / f"ft-{name}" / "config.yaml").read_text())
        assert saved["mean"] == [0.4, 0.5, 0.6] and saved["std"] == [0.2, 0.2, 0.2], name
    cli_finetune(tiny_folder, run, tmp_path / "ft-given", "--img-size", "32", "--max-steps", "1",
                 "--mean", "0.1", "0.1", "0.1")  # fmt: skip
    given = yaml.safe_load((tmp_path / "ft-given" / "config.yaml").read_text())
    assert given["mean"] == [0.1, 0.1, 0.1] and given["std"] == [0.229, 0.224, 0.225]  # ImageNet's std, as before


def _val_top1_of_export(path, data):
    """The val top-1 of an exported classifier, loaded by timm as `mimkit export` says, fed as fine-tuning fed it."""
    from safetensors import safe_open

    from mimkit.data import labelled_splits
    from mimkit.eval.features import predict
    from mimkit.eval.knn import topk_accuracy
    from mimkit.export import create_timm_from_export

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    net = create_timm_from_export(path).eval()
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in load_file(str(path)).items())  # the head too: timm kept it
    cfg = json.loads(meta["data_cfg"])
    logits, labels = predict(net, labelled_splits(data)[1], tuple(cfg["input_size"][1:]), cfg["mean"], cfg["std"])
    return topk_accuracy(logits, labels)["top1"], meta


def test_export_of_a_fine_tuning_run_is_the_trained_classifier(easy, tmp_path, capsys):
    """`mimkit export RUN` of a fine-tuning run (it stopped: "unknown model 'finetune:...'") writes the timm
    classifier of best.pt with its trained head, class names and normalization: loaded by timm, it scores the val
    top-1 the run recorded, for a ViT and for a mimkit pyramid; a checkpoint written before the classifier's options
    were kept exports too; --head-classes is refused with one line."""
    for name, size in (("mae_vit_pico_patch8", 32), ("umae_swin_pico_128", 64)):
        run = tmp_path / name
        res = finetune(
            FinetuneConfig(data=str(easy), output=str(run), random_init=name, epochs=2, **{**COMMON, "img_size": size})
        )
        out = tmp_path / f"{name}.safetensors"
        capsys.readouterr()
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert f"classifier of {run / 'best.pt'} (2 classes" in capsys.readouterr().out
        top1, meta = _val_top1_of_export(out, easy)
        assert top1 == pytest.approx(res["best_val_top1"]) and float(meta["best_val_top1"]) == pytest.approx(top1)
        assert json.loads(meta["classes"]) == ["blue", "red"] and meta["head"] == "2"
        assert json.loads(meta["data_cfg"])["input_size"] == [3, size, size]
        trained = torch.load(run / "best.pt", weights_only=True)["model"]
        written = load_file(str(out))
        assert written.keys() >= {"head.weight", "head.bias"}
        for key, value in written.items():  # every tensor is the checkpoint's, the head included
            assert torch.equal(value, trained[f"net.{key}"]), key
    from mimkit.eval.finetune import load_encoder_source

    for source in (run, out):  # fine-tuned again (on other data): the run itself, or its export
        encoder, timm_name, kwargs = load_encoder_source(str(source))
        assert timm_name == "mimswin_pico_patch4_window16_128" and "num_classes" not in kwargs
        assert encoder.keys() == {k[4:] for k in trained if not k.startswith("net.head.")}
        assert all(torch.equal(v, trained[f"net.{k}"]) for k, v in encoder.items())
    again = FinetuneConfig(data=str(easy), output=str(tmp_path / "again"), pretrained=str(out), epochs=1, **COMMON)
    assert finetune(again)["epochs_done"] == 1
    state = torch.load(run / "best.pt", weights_only=True)
    del state["classifier"]  # as written before this change
    torch.save(state, tmp_path / "old.pt")
    assert main(["export", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old.safetensors")]) == 0
    top1, meta = _val_top1_of_export(tmp_path / "old.safetensors", easy)
    assert top1 == pytest.approx(state["extra"]["val_top1"]) and "classes" not in meta
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors"), "--head-classes", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--head-classes 5" in err and "fine-tuning run" in err
