"""Every option of every subcommand, given bad values, and every kind of bad weights file: one line on stderr
naming the option or file, exit code 2, no traceback, and no work done (issue: validation before work)."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mimkit.cli import build_parser, main
from mimkit.config import PretrainConfig
from mimkit.eval.finetune import FinetuneConfig

PICO = ["--random-init", "mae_vit_pico_patch8", "--img-size", "32"]


@pytest.fixture(scope="module")
def env(tiny_folder, tmp_path_factory):
    """Valid base command lines per subcommand; a bad value appended last overrides the base's."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    from mimkit.pretraining import pretrain

    from conftest import pico_config

    pretrain(pico_config(tiny_folder, tmp / "run", epochs=1, max_steps=1))
    ckpt = str(sorted((tmp / "run").glob("checkpoint-*.pt"))[-1])
    data = str(tiny_folder)
    train = [
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--no-progress",
        "--max-steps",
        "1",
        "--no-tensorboard",
        "--img-size",
        "32",
    ]
    base = {
        "pretrain": ["--data", data, "--output", str(tmp / "p"), "--model", "mae_vit_pico_patch8", *train],
        "finetune": [
            "--data",
            data,
            "--output",
            str(tmp / "f"),
            "--random-init",
            "mae_vit_pico_patch8",
            *train,
            "--mixup",
            "0",
            "--cutmix",
            "0",
            "--randaug",
            "",
        ],
        "knn": [*PICO, "--data", data],
        "linprobe": [*PICO, "--data", data, "--epochs", "1"],
        "export": [ckpt, "--out", str(tmp / "e.safetensors")],
        "visualize": [*PICO, "--data", data, "--out", str(tmp / "v.png")],
        "bench": [
            "--models",
            "mae_vit_pico_patch8",
            "--img-size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--precision",
            "fp32",
        ],
        "mask-frequency": ["--iterations", "2", "--out", str(tmp / "m.png")],
        "ablate-masking": ["--data", data, "--output", str(tmp / "a"), "--epochs", "1"],
        "demo": ["--data", data, "--output", str(tmp / "d"), "--minutes", "0.01"],
        "shards": ["--data", data, "--out", str(tmp / "s"), "--no-progress"],
        "bench-data": ["--data", data, "--img-size", "32", "--batch-size", "2", "--batches", "1", "--workers", "0"],
        "compare": [
            "--data",
            data,
            "--eval-data",
            data,
            "--models",
            "mae_vit_pico_patch8",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--img-size",
            "32",
            "--batch-size",
            "4",
            "--output",
            str(tmp / "c"),
        ],  # fmt: skip
        "models": [],
        "recipes": [],
    }
    return dict(base=base, file=str(a_file), dir=str(a_dir), tmp=tmp, ckpt=ckpt, data=data)


def explicit_cases(e) -> dict:
    """Bad values of options whose values are names or paths (the numbers and choices are derived below)."""
    missing = "/nonexistent/mimkit-test"
    common_train = {
        "--data": [[missing]],
        "--recipe": [["no_such_recipe"]],
        "--resume": [[missing + ".pt"]],
        "--output": [[e["file"]]],
        "--shard-index": [[missing + ".json"]],
        "--logger": [["bogus"], ["csv,nope"]],
        "--image-column": [["image"]],  # the base's --data is a folder, not an hf: source
        "--init": [[missing + ".pth"]],
    }
    return {
        "pretrain": {
            **common_train,
            "--model": [["mae_vit_pico_patchh8"]],
            "--model-arg": [["noequals"], ["decoder_layers=2"]],
            "--monitor-data": [[missing]],
            "--monitor-image-column": [["image"]],  # no hf: --monitor-data
            "--monitor-label-column": [["label"]],
        },
        "finetune": {
            **common_train,
            "--random-init": [["no_such_model"]],
            "--randaug": [["bogus-spec"]],
            "--pretrained": [[missing]],
            "--label-column": [["label"]],  # the base's --data is a folder, not an hf: source
        },
        "knn": {
            "--random-init": [["no_such_model"]],
            "--data": [[missing]],
            "--device": [["tpu"]],
            "--image-column": [["image"]],
            "--label-column": [["label"]],
        },
        "linprobe": {
            "--image-column": [["image"]],
            "--label-column": [["label"]],
            "--random-init": [["no_such_model"]],
            "--data": [[missing]],
            "--device": [["tpu"]],
            "--output": [[e["file"]]],
        },
        "export": {"--out": [[e["dir"]], [str(e["tmp"] / "encoder.pt")], ["/dev/null"]]},  # timm reads by suffix
        "visualize": {
            "--random-init": [["no_such_model"]],
            "--data": [[missing]],
            "--out": [[e["dir"]], [str(e["tmp"] / "figure")], ["/dev/null"]],  # Pillow's format is the suffix
            "--image-column": [["image"]],
        },
        "bench": {
            "--models": [["no_such_model"], ["mae_vit_pico_patch8:nope=1"]],
            "--device": [["tpu"]],
            "--model-arg": [["decoder_layers=2"]],
        },
        "mask-frequency": {"--out": [[e["dir"]], [str(e["tmp"] / "frequency.svg")]]},
        "ablate-masking": {"--data": [[missing]], "--output": [[e["file"]]], "--recipe": [["no_such_recipe"]]},
        "demo": {"--data": [[missing]], "--output": [[e["file"]]]},
        "shards": {"--data": [[missing]], "--out": [[e["file"]]]},
        "compare": {
            "--recipe": [["no_such_recipe"]],
            "--data": [[missing]],
            "--eval-data": [[missing]],
            "--image-column": [["image"]],
            "--eval-image-column": [["image"]],
            "--eval-label-column": [["label"]],
            "--models": [["no_such_model"]],
            "--output": [[e["file"]]],
        },
        "bench-data": {
            "--data": [[missing]],
            "--image-column": [["image"]],  # the base's --data is a folder, not an hf: source
            "--shard-index": [[missing + ".json"]],
            "--model": [["no_such_model"]],
            "--device": [["tpu"]],
        },
    }


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _config_meta(command: str, dest: str):
    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}.get(command)
    if cls is None:
        return None
    return next((f.metadata for f in dataclasses.fields(cls) if f.name == dest), None)


def _out_of_range(kind, meta) -> list[str]:
    values = []
    if "min" in meta and meta["min"] is not None:
        values.append(meta["min"] - 1)
    if "gt" in meta:
        values.append(meta["gt"])
    if "max" in meta:
        values.append(meta["max"] + 1)
    if "lt" in meta:
        values.append(meta["lt"])
    return [str(kind(v)) for v in values]


def derived_cases(command, action) -> list[list[str]] | None:
    """Bad values from the option's declared type, range and choices; None when it takes no value."""
    if action.nargs == 0:
        return None  # a flag
    if action.choices:
        return [["bogus"]]
    meta = _config_meta(command, action.dest)
    bounds = getattr(action.type, "bounds", None)
    kind = bounds["kind"] if bounds else action.type if action.type in (int, float) else None
    if kind is None:
        return []
    cases = [["abc"]]
    if bounds:
        low = {"min": bounds["low"]} if bounds["low"] is not None and not bounds["low_open"] else {}
        low |= {"gt": bounds["low"]} if bounds["low"] is not None and bounds["low_open"] else {}
        high = {"max": bounds["high"]} if bounds["high"] is not None and not bounds["high_open"] else {}
        high |= {"lt": bounds["high"]} if bounds["high"] is not None and bounds["high_open"] else {}
        cases += [[v] for v in _out_of_range(kind, {**low, **high})]
    elif meta is not None:
        rng = _out_of_range(kind, meta)
        if action.nargs == "+":
            length = meta.get("length")
            good = {"crop_scale": "0.5", "betas": "0.9", "mean": "0.5", "std": "0.5"}.get(action.dest, "1")
            cases += [[v] * (length or 1) for v in rng]
            if length:
                cases.append([good])  # one value where two are needed
            if action.dest == "mean":
                cases.append(["0.5", "0.5"])  # a mean per channel but std for three
            if action.dest == "std":
                cases.append(["0", "0", "0"])
        else:
            cases += [[v] for v in rng]
    return cases


def all_cases(e):
    """(command, flag, values) for every option of every subcommand, and the options that cannot be bad."""
    explicit = explicit_cases(e)
    cases, flags, uncovered = [], [], []
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = max(action.option_strings, key=len)
            derived = derived_cases(command, action)
            given = explicit.get(command, {}).get(flag, [])
            if derived is None:
                flags.append((command, flag))
                continue
            if not derived and not given:
                uncovered.append((command, flag))
            for values in [*derived, *given]:
                cases.append((command, flag, values))
    return cases, flags, uncovered


def test_every_option_that_takes_a_value_has_bad_values(env):
    cases, flags, uncovered = all_cases(env)
    assert not uncovered, f"options without a bad-value case: {uncovered}"
    assert len(cases) > 150 and ("pretrain", "--save-every-epochs") in {(c, f) for c, f, _ in cases}


def test_bad_values_of_every_option_are_one_line_errors_with_exit_code_2(env, capsys):
    cases, _, _ = all_cases(env)
    failures = []
    for command, flag, values in cases:
        base = list(env["base"][command])
        if flag == "--pretrained":  # instead of the base's --random-init
            i = base.index("--random-init")
            del base[i : i + 2]
        argv = [command, *base, flag, *values]
        rc = main(argv)
        out, err = capsys.readouterr()
        name = flag[2:].replace("-", "_")
        ok = (
            rc == 2
            and err.count("\n") == 1
            and "Traceback" not in err
            and (flag in err or name in err or values[0] in err)
        )
        if not ok:
            failures.append(f"{' '.join(argv[:1] + [flag, *values])}: rc {rc}, stderr {err.strip()[:300]!r}")
    assert not failures, "\n".join(failures)


def _bad_files(e) -> dict[str, Path]:
    tmp = e["tmp"] / "bad_files"
    tmp.mkdir(exist_ok=True)
    good = torch.load(e["ckpt"], weights_only=True)
    files = {"missing": tmp / "missing.pt"}
    files["random bytes"] = tmp / "random.pt"
    files["random bytes"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    wrong = dict(good, config={**good["config"], "model": "mae_vit_nano_patch8"})
    files["wrong shapes"] = tmp / "wrong_shapes.pt"
    torch.save(wrong, files["wrong shapes"])
    files["unknown model"] = tmp / "unknown_model.pt"
    torch.save(dict(good, config={**good["config"], "model": "no_such_model"}), files["unknown model"])
    files["no model entry"] = tmp / "no_model.pt"
    torch.save({k: v for k, v in good.items() if k != "model"}, files["no model entry"])
    files["pickled code"] = tmp / "code.pt"
    torch.save({"model": argparse.Namespace(x=1)}, files["pickled code"])
    files["empty folder"] = tmp / "empty_run"
    files["empty folder"].mkdir(exist_ok=True)
    files["random safetensors"] = tmp / "random.safetensors"
    files["random safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return files


@pytest.mark.parametrize("command", ["knn", "linprobe", "export", "visualize", "finetune"])
def test_bad_weight_files_are_one_line_errors_naming_the_file(env, command, capsys):
    failures = []
    for kind, path in _bad_files(env).items():
        if kind == "random safetensors" and command != "finetune":
            continue
        if command == "export":
            argv = ["export", str(path), "--out", str(env["tmp"] / "x.safetensors")]
        elif command == "finetune":
            base = [a for a in env["base"]["finetune"]]
            i = base.index("--random-init")
            del base[i : i + 2]
            argv = ["finetune", *base, "--pretrained", str(path)]
        else:
            extra = ["--out", str(env["tmp"] / "x.png")] if command == "visualize" else []
            extra += ["--epochs", "1"] if command == "linprobe" else []
            argv = [command, str(path), "--data", env["data"], *extra]
        rc = main(argv)
        _, err = capsys.readouterr()
        ok = (
            rc == 2
            and err.count("\n") == 1
            and path.name in err
            and "Traceback" not in err
            and "weights_only=False" not in err
        )
        if not ok:
            failures.append(f"{kind}: rc {rc}: {err.strip()[:300]!r}")
    assert not failures, "\n".join(failures)


def test_a_worker_that_raises_gives_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(80):
        (bad / f"{i:03d}.jpg").write_bytes(b"not an image")
    rc = main(
        [
            "pretrain",
            "--data",
            str(bad),
            "--output",
            str(tmp_path / "out"),
            "--model",
            "mae_vit_pico_patch8",
            "--img-size",
            "32",
            "--batch-size",
            "4",
            "--num-workers",
            "1",
            "--no-progress",
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "could not be read" in errors[0] and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "umae_swin_pico_128", "--img-size", "96"],  # 24 stage-1 tokens: not a whole number of windows
        ["--model", "umae_vit_pico_patch8", "--model-arg", "sm_ratio=1.5"],
    ],
    ids=["size-against-windows", "model-arg-range"],
)
def test_values_only_the_model_can_check_stop_the_run_before_any_work(env, extra, capsys):
    """The method is built on the meta device before the output folder, the data index or the dataset statistics."""
    out = env["tmp"] / f"no_work_{extra[1]}"
    rc = main(["pretrain", *env["base"]["pretrain"], "--output", str(out), "--compute-mean-std", *extra])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.count("\n") == 1 and extra[1] in captured.err and "Traceback" not in captured.err
    assert not out.exists() and "dataset mean" not in captured.out + captured.err


def test_an_evaluation_size_the_model_cannot_take_is_one_line(tmp_path, tiny_folder, capsys):
    """knn / linprobe --img-size of a checkpoint or export was a traceback from deep in the model when it did not fit
    (a Swin's windows); now one line naming --img-size and the model's own size, as is visualize's, which draws at
    the pretraining size only. A size that fits is used; a ViT is rebuilt for it (test_eval.py)."""
    from conftest import cli_pretrain

    vit, swin = tmp_path / "vit", tmp_path / "swin"
    cli_pretrain(tiny_folder, vit, "mae_vit_pico_patch8", "--img-size", "32")
    cli_pretrain(tiny_folder, swin, "umae_swin_pico_128")
    assert main(["export", str(swin), "--out", str(tmp_path / "swin.safetensors")]) == 0
    capsys.readouterr()
    data = ["--data", str(tiny_folder)]
    for argv, own in (
        (["knn", str(swin), "--img-size", "96"], "128 px"),
        (["linprobe", str(tmp_path / "swin.safetensors"), "--img-size", "96", "--epochs", "1"], "128 px"),
        (["visualize", str(vit), "--img-size", "64", "--out", str(tmp_path / "v.png")], "32 px"),
    ):
        assert main([*argv, *data]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: img_size (--img-size) = ") and own in err and err.count("\n") == 1, err
    for source, size in ((swin, [256]), (vit, [48]), (vit, [32, 48])):  # one value, or HEIGHT WIDTH as pretrain's
        assert main(["knn", str(source), "--img-size", *map(str, size), "--k", "3", "--json", *data]) == 0
        assert json.loads(capsys.readouterr().out)["img_size"] == (size[0] if len(size) == 1 else size)
    assert main(["knn", str(vit), "--img-size", "32", "48", "64", *data]) == 2
    assert capsys.readouterr().err.endswith("give one size (square) or two: HEIGHT WIDTH\n")


def test_an_output_that_cannot_be_written_is_one_line_with_exit_code_5(tmp_path, tiny_folder, capsys, monkeypatch):
    """A full disk (or a read-only folder) while writing a figure or an export was a traceback from Pillow or
    safetensors; now one line naming the file, exit code 5 as for a checkpoint. Other OS errors keep their
    traceback (they are not the machine's doing)."""
    import errno

    from PIL import Image

    import mimkit.export

    from conftest import cli_pretrain

    run = tmp_path / "run"
    cli_pretrain(tiny_folder, run, "mae_vit_pico_patch8", "--img-size", "32")
    capsys.readouterr()

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    fig = tmp_path / "freq.png"
    assert main(["mask-frequency", "--out", str(fig), "--iterations", "10"]) == 5
    want = f"error: {fig}: No space left on device; free space, or give a folder this user can write\n"
    assert capsys.readouterr().err == want

    def unwritable(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mimkit.export, "save_file", unwritable)
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 5
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: not written (") and "No space left" in err and err.count("\n") == 1

    def odd(self, fp, *args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(Image.Image, "save", odd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["mask-frequency", "--out", str(fig), "--iterations", "10"])
