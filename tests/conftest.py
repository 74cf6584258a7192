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

    values = dict(data=str(data), output=str(output), model="mae_vit_pico_patch8", img_size=32, epochs=2,
                  batch_size=4, blr=1e-3, warmup_epochs=1, precision="fp32", num_workers=0, resume="none",
                  progress=False, tensorboard=False, log_every=1, seed=0)
    values.update(overrides)
    return PretrainConfig(**values)
