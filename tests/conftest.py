from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mimkit  # noqa: F401  (compat shim before anything imports timm)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "examples" / "sample_images"
CALTECH = REPO.parent / "shared" / "data" / "caltech101"


def make_folder(root: Path, classes=("red", "blue"), per_class=(12, 4), size=(72, 80), seed=0) -> Path:
    """A labelled ImageFolder whose two classes differ in colour (separable by any sensible feature)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((size[0], size[1], 3)) * 80).astype(np.uint8)
                arr[..., ci * 2 % 3] += 150
                Image.fromarray(arr).save(d / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny"))


def pico_config(data, output, **overrides):
    from mimkit.config import PretrainConfig

    values = dict(
        data=str(data),
        output=str(output),
        model="mae_vit_pico_patch8",
        img_size=32,
        epochs=2,
        batch_size=4,
        blr=1e-3,
        warmup_epochs=1,
        precision="fp32",
        num_workers=0,
        resume="none",
        progress=False,
        tensorboard=False,
        log_every=1,
        seed=0,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def fit_fixed_batch(model, batch: dict, steps: int, lr: float = 2e-3, seed: int = 0) -> tuple[float, float]:
    """AdamW on one batch with the same masks every step (reseeded): a memorization check. (first, last) loss."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(seed)
        loss, _ = model(batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def _cli_json(argv: list[str]) -> dict:
    """Run ``mimkit ARGV`` (must succeed) and parse the JSON summary it prints last."""
    import contextlib
    import io
    import json

    from mimkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    text = out.getvalue()
    return json.loads(text[text.index("{") :])


def cli_pretrain(data, run, model: str, *extra: str, epochs: int = 1) -> dict:
    """``mimkit pretrain`` on a tiny folder at batch 4 on CPU; returns the printed summary."""
    return _cli_json(
        [
            "pretrain",
            "--data",
            str(data),
            "--model",
            model,
            "--epochs",
            str(epochs),
            "--batch-size",
            "4",
            "--precision",
            "fp32",
            "--num-workers",
            "0",
            "--output",
            str(run),
            "--no-progress",
            "--warmup-epochs",
            "0.5",
            *extra,
        ]
    )


def cli_finetune(data, pretrained, out, *extra: str) -> dict:
    """``mimkit finetune`` for one epoch at batch 4 on CPU, no mixup; returns the printed summary."""
    return _cli_json(
        [
            "finetune",
            "--data",
            str(data),
            "--pretrained",
            str(pretrained),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--precision",
            "fp32",
            "--num-workers",
            "0",
            "--output",
            str(out),
            "--no-progress",
            "--mixup",
            "0",
            "--cutmix",
            "0",
            *extra,
        ]
    )


def exported_twin(model, path):
    """Move the encoder's weights away from init (so that a silent non-load would show), export it to ``path`` and
    load the file with timm's documented call: (export metadata, the timm model in eval mode)."""
    import timm
    import torch

    from mimkit.export import export_encoder

    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    meta = export_encoder(model, path)
    net = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return meta, net.eval()
