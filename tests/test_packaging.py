"""The wheel: what `pip install mimkit` (not editable) gets. The editable install of `make install` maps the whole
source folder, so a subpackage missing from pyproject.toml's package list goes unnoticed there; this builds the wheel,
checks that every module, recipe and sample image is in it, and runs the installed copy away from the checkout."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (whl,) = out.glob("mimkit-*.whl")
    return whl


def test_wheel_has_every_module_recipe_and_sample_image(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "mimkit").rglob("*.py")}
    assert "mimkit/models/layers/__init__.py" in modules and len(modules) > 40
    assert sorted(modules - names) == []  # a folder left out of [tool.setuptools] packages shows up here
    recipes = {f"mimkit/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")}
    assert recipes and sorted(recipes - names) == []
    images = {
        "mimkit/sample_images/" + p.relative_to(REPO / "examples" / "sample_images").as_posix()
        for p in (REPO / "examples" / "sample_images").rglob("*.jpg")
    }
    assert len(images) >= 100 and sorted(images - names) == []


@pytest.mark.slow
def test_installed_wheel_imports_and_trains_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = tmp_path / "run"
    script = f"""
import json, sys
import mimkit
from pathlib import Path
from mimkit.cli import main
assert Path(mimkit.__file__).resolve().is_relative_to(Path({str(site)!r}).resolve()), mimkit.__file__
images = Path(mimkit.__file__).parent / "sample_images"
assert main(["models"]) == 0
code = main(["pretrain", "--recipe", "demo_cpu", "--data", str(images), "--output", {str(run)!r}, "--epochs", "1",
             "--max-steps", "1", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--no-tensorboard"])
print("EXIT", code)
"""
    # the checkout is not on the path (cwd elsewhere; the wheel's folder first, ahead of the editable install's finder)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EXIT 0" in done.stdout and "mae_vit_base_patch16" in done.stdout
    start = done.stdout.rindex("\n{\n")  # the summary that `pretrain` prints
    summary = json.loads(done.stdout[start : done.stdout.index("\n}\n", start) + 3])
    assert summary["steps"] == 1 and (run / "config.yaml").is_file()
