import argparse

import pytest

from mimkit.config import (
    ConfigError,
    PretrainConfig,
    add_config_arguments,
    available_recipes,
    config_from_args,
    config_from_dict,
    load_recipe,
)


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, PretrainConfig)
    return config_from_args(p.parse_args(argv), PretrainConfig)


def test_unknown_key_names_option_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown option 'batchsize'.*batch_size"):
        config_from_dict(PretrainConfig, {"batchsize": 3}, "recipe x")


def test_recipe_then_flags_precedence(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("description: test\nepochs: 7\nbatch_size: 5\nmodel_args: {decoder_depth: 1}\n")
    cfg = parse(
        [
            "--recipe",
            str(r),
            "--batch-size",
            "9",
            "--model-arg",
            "decoder_dim=32",
            "--no-tensorboard",
            "--mean",
            "0.5",
            "0.5",
            "0.5",
        ]
    )
    assert cfg.epochs == 7 and cfg.batch_size == 9 and cfg.tensorboard is False
    assert cfg.model_args == {"decoder_depth": 1, "decoder_dim": 32}
    assert cfg.mean == [0.5, 0.5, 0.5]


def test_unknown_key_in_recipe_file(tmp_path):
    r = tmp_path / "bad.yaml"
    r.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz.*epochs"):
        parse(["--recipe", str(r)])


def test_missing_recipe_lists_bundled():
    with pytest.raises(ConfigError, match="demo_cpu"):
        parse(["--recipe", "demo_cpuu"])


@pytest.mark.parametrize("name", available_recipes())
def test_every_bundled_recipe_is_valid(name):
    from mimkit.methods import method_options
    from mimkit.pretraining import check_model

    values = load_recipe(name)
    cfg = config_from_dict(PretrainConfig, values, name)
    opts = method_options(cfg.model)
    assert set(cfg.model_args) <= set(opts)
    check_model(cfg)  # the model builds with the recipe's values (on the meta device): sizes, ratios, channels


def test_defaults_documented_in_help(capsys):
    p = argparse.ArgumentParser()
    add_config_arguments(p, PretrainConfig)
    text = p.format_help()
    for f in PretrainConfig.__dataclass_fields__:
        flag = "--model-arg" if f == "model_args" else "--" + f.replace("_", "-")
        assert flag in text, flag
