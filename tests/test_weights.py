"""--init from public weights: small state dicts written here in each released layout (MAE, timm, UM-MAE Swin/PVT,
SimMIM Swin; no downloads) load onto mimkit's models with the right report."""

import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimkit.engine.checkpoint import CheckpointError
from mimkit.methods import create_method
from mimkit.weights import detect_layout, load_public_weights

from conftest import SAMPLES

MAE_DECODER = {"decoder.embed": "decoder_embed", "decoder.mask_token": "mask_token", "decoder.norm": "decoder_norm",
               "decoder.pred": "decoder_pred"}  # fmt: skip


def _released_mae(model, full=True) -> dict:
    """MAE's released layout: timm encoder names at the top level, decoder_* names, a fixed decoder_pos_embed."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            out[k.removeprefix("encoder.")] = v.clone()
        elif full and k.startswith("decoder.blocks."):
            out["decoder_blocks." + k.removeprefix("decoder.blocks.")] = v.clone()
        elif full:
            head = next(h for h in MAE_DECODER if k.startswith(h))
            out[MAE_DECODER[head] + k.removeprefix(head)] = v.clone()
    if full:
        out["decoder_pos_embed"] = torch.zeros(1, 65, 64)
    return out


def _released_ummae_swin(model) -> dict:
    """UM-MAE's Swin: blocks numbered across stages, merging inside a stage's first block (norm + proj conv), the
    position-bias MLP as two 1x1 convolutions, decoder_embed before the pixel shuffle."""
    out, g = {}, 0
    sd = model.state_dict()
    for s, stage in enumerate(model.encoder.stages):
        for b in range(len(stage.blocks)):
            for k, v in sd.items():
                prefix = f"encoder.stages.{s}.blocks.{b}."
                if k.startswith(prefix):
                    rest = k.removeprefix(prefix)
                    m = re.match(r"attn\.pos_mlp\.fc(1|2)\.(weight|bias)", rest)
                    if m:
                        conv = "0" if m.group(1) == "1" else "2"
                        out[f"blocks.{g}.attn.posmlp.{conv}.{m.group(2)}"] = v[..., None, None] if v.ndim == 2 else v
                    else:
                        out[f"blocks.{g}.{rest}"] = v
            if s > 0 and b == 0:
                out[f"blocks.{g}.downsample.norm.weight"] = sd[f"encoder.stages.{s}.downsample.norm.weight"]
                out[f"blocks.{g}.downsample.norm.bias"] = sd[f"encoder.stages.{s}.downsample.norm.bias"]
                out[f"blocks.{g}.downsample.proj.weight"] = sd[f"encoder.stages.{s}.downsample.reduction.weight"]
                out[f"blocks.{g}.downsample.proj.bias"] = sd[f"encoder.stages.{s}.downsample.reduction.bias"]
            g += 1
    for k, v in sd.items():
        if k.startswith("encoder.patch_embed.") or k.startswith("encoder.norm."):
            out[k.removeprefix("encoder.")] = v
        elif k.startswith("to_decoder."):
            out["decoder_embed." + k.removeprefix("to_decoder.")] = v
        elif k.startswith("decoder.blocks."):
            out["decoder_blocks." + k.removeprefix("decoder.blocks.")] = v
        elif k.startswith("decoder."):
            head = next(h for h in MAE_DECODER if k.startswith(h))
            out[MAE_DECODER[head] + k.removeprefix(head)] = v
        elif k == "vis_mask_token":
            out[k] = v
    out["decoder_pos_embed"] = torch.zeros(1, 64, 32)
    return {k: v.clone() for k, v in out.items()}


def _released_ummae_pvt(model) -> dict:
    """UM-MAE's PVT: blocks numbered across stages, stage embeddings as blocks.N.downsample.proj without a norm."""
    out, g = {}, 0
    sd = model.state_dict()
    for s, stage in enumerate(model.encoder.stages):
        for b in range(len(stage.blocks)):
            prefix = f"encoder.stages.{s}.blocks.{b}."
            out.update({f"blocks.{g}." + k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)})
            if s > 0 and b == 0:
                out[f"blocks.{g}.downsample.proj.weight"] = sd[f"encoder.stages.{s}.patch_embed.proj.weight"]
                out[f"blocks.{g}.downsample.proj.bias"] = sd[f"encoder.stages.{s}.patch_embed.proj.bias"]
            g += 1
    out["patch_embed.proj.weight"] = sd["encoder.stages.0.patch_embed.proj.weight"]
    out["patch_embed.proj.bias"] = sd["encoder.stages.0.patch_embed.proj.bias"]
    out["pos_embed"], out["norm.weight"], out["norm.bias"] = (
        sd["encoder.pos_embed"], sd["encoder.norm.weight"], sd["encoder.norm.bias"])  # fmt: skip
    return {k: v.clone() for k, v in out.items()}


def _released_simmim_swin(model) -> dict:
    """SimMIM's Swin (v1): encoder.layers.S with the merging at the end of a stage, index buffers, encoder.mask_token,
    and decoder.0 as a 1x1 convolution."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"encoder\.stages\.(\d+)\.(.*)", k)
        if m and m.group(2).startswith("downsample."):
            out[f"encoder.layers.{int(m.group(1)) - 1}.{m.group(2)}"] = v
        elif m:
            out[f"encoder.layers.{m.group(1)}.{m.group(2)}"] = v
            if m.group(2).endswith("relative_position_bias_table"):
                index = m.group(2).replace("relative_position_bias_table", "relative_position_index")
                out[f"encoder.layers.{m.group(1)}.{index}"] = torch.zeros(4, 4, dtype=torch.long)
        elif k == "mask_token":
            out["encoder.mask_token"] = v.view(1, 1, -1)
        elif k.startswith("head."):
            out["decoder.0." + k.removeprefix("head.")] = v[..., None, None] if v.ndim == 2 else v
        else:
            out[k] = v
    return {k: v.clone() for k, v in out.items()}


def _same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(5)
    la, _ = a({"image": x, "index": torch.arange(2)})
    torch.manual_seed(5)
    lb, _ = b({"image": x, "index": torch.arange(2)})
    return torch.allclose(la, lb, atol=1e-6)


def _fresh(name, seed, **kw):
    torch.manual_seed(seed)
    return create_method(name, **kw).eval()


def test_mae_full_and_encoder_only_files(tmp_path):
    source = _fresh("mae_vit_pico_patch8", 1)
    torch.save({"model": _released_mae(source)}, tmp_path / "mae_full.pth")
    torch.save({"model": _released_mae(source, full=False)}, tmp_path / "mae_enc.pth")
    target = _fresh("mae_vit_pico_patch8", 2)
    report = load_public_weights(target, tmp_path / "mae_full.pth")
    assert report.layout == "mae" and report.new == [] and report.ignored == ["decoder_pos_embed"]
    assert _same_outputs(source, target, 64)
    target = _fresh("mae_vit_pico_patch8", 3)
    report = load_public_weights(target, tmp_path / "mae_enc.pth")
    assert report.layout == "timm" and report.new and all(k.startswith("decoder.") for k in report.new)
    assert torch.equal(target.encoder.blocks[0].attn.qkv.weight, source.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(target.decoder.pred.weight, source.decoder.pred.weight)


def test_timm_safetensors_with_a_classifier_and_another_grid(tmp_path):
    vit = timm.create_model("vit_pico_patch8_64", num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    target = _fresh("mae_vit_pico_patch8", 0, img_size=96)  # a 12x12 grid instead of 8x8
    report = load_public_weights(target, tmp_path / "vit.safetensors")
    assert report.layout == "timm" and {"head.weight", "head.bias"} <= set(report.ignored)
    assert report.resampled == ["encoder.pos_embed"] and target.encoder.pos_embed.shape[1] == 1 + 144
    assert torch.equal(target.encoder.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


def test_ummae_swin_file_gives_the_same_model(tmp_path):
    source, target = _fresh("umae_swin_pico_128", 1), _fresh("umae_swin_pico_128", 2)
    state = _released_ummae_swin(source)
    assert detect_layout(state) == "ummae_swin"
    path = _save(state, tmp_path)
    report = load_public_weights(target, path)
    assert report.new == [] and report.ignored == ["decoder_pos_embed"]
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    assert _same_outputs(source, target, 128)


def test_ummae_pvt_file_fills_the_whole_encoder(tmp_path):
    source, target = _fresh("umae_pvt_pico_128", 1), _fresh("umae_pvt_pico_128", 2)
    state = {k: v for k, v in _released_ummae_pvt(source).items()}
    assert detect_layout(state) == "ummae_pvt"
    report = load_public_weights(target, _save(state, tmp_path))
    # mimkit's PVT has the released layout (no norm after the patch embeddings, a reduction in every stage): only
    # the decoder, which this encoder file lacks, is new
    assert report.new and sorted(report.new) == sorted(k for k in target.state_dict() if not k.startswith("encoder."))
    t, s = target.encoder.stages, source.encoder.stages
    assert torch.equal(t[2].blocks[0].attn.sr.weight, s[2].blocks[0].attn.sr.weight)
    assert torch.equal(t[3].blocks[0].attn.sr.weight, s[3].blocks[0].attn.sr.weight)  # ratio 1: reduced too
    assert torch.equal(t[3].patch_embed.proj.weight, s[3].patch_embed.proj.weight)


def test_simmim_swin_file_gives_the_same_model(tmp_path):
    source, target = _fresh("simmim_mixswin_pico_128", 1), _fresh("simmim_mixswin_pico_128", 2)
    state = _released_simmim_swin(source)
    assert detect_layout(state) == "simmim_swin"
    report = load_public_weights(target, _save(state, tmp_path))
    assert report.new == [] and all("relative_position_index" in k for k in report.ignored)
    assert _same_outputs(source, target, 128)


def test_bad_files_are_one_line_errors(tmp_path):
    model = _fresh("mae_vit_pico_patch8", 0)
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_public_weights(model, tmp_path / "junk.pth")
    torch.save({"model": {"foo.bar": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="layout not recognised"):
        load_public_weights(model, tmp_path / "other.pth")
    wide = _fresh("mae_vit_nano_patch8", 0)
    torch.save({"model": _released_mae(wide, full=False)}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="do not fit model shapes"):
        load_public_weights(model, tmp_path / "wide.pth")


def _save(state, folder):
    path = folder / "released.pth"
    torch.save({"model": state}, path)
    return str(path)


def test_cli_init_reports_and_a_resume_does_not_reload(tmp_path, capsys):
    from mimkit.cli import main

    source = _fresh("mae_vit_pico_patch8", 1)
    torch.save({"model": _released_mae(source)}, tmp_path / "mae.pth")
    out = tmp_path / "run"
    common = ["pretrain", "--data", str(SAMPLES), "--model", "mae_vit_pico_patch8", "--epochs", "1", "--batch-size",
              "8", "--num-workers", "0", "--no-progress", "--no-tensorboard",
              "--init", str(tmp_path / "mae.pth")]  # fmt: skip
    assert main([*common, "--max-steps", "1", "--output", str(out)]) == 0
    report = json.loads((out / "init-report.json").read_text())
    assert report["layout"] == "mae" and report["loaded"] == len(source.state_dict()) and report["new"] == []
    assert "--init" in (out / "train.log").read_text()
    (out / "init-report.json").unlink()
    assert main([*common, "--max-steps", "2", "--output", str(out)]) == 0
    assert not (out / "init-report.json").exists()  # resumed: the checkpoint's weights, not the file's
    capsys.readouterr()
    assert main([*common[:-1], str(tmp_path / "nope.pth"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "init (--init)" in err and len(err.strip().splitlines()) == 1


def test_finetune_reads_released_vit_files_and_random_init_with_init(tmp_path):
    from mimkit.eval.finetune import load_encoder_source

    vit = timm.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=5)
    torch.save({"model": vit.state_dict()}, tmp_path / "mae_vit_small.pth")
    state, name, kwargs = load_encoder_source(str(tmp_path / "mae_vit_small.pth"))
    assert name == "vit_small_patch16_224" and kwargs["img_size"] == 64 and kwargs["depth"] == 2
    assert "head.weight" not in state and torch.equal(state["blocks.1.attn.qkv.weight"], vit.blocks[1].attn.qkv.weight)
    rebuilt = timm.create_model(name, num_classes=0, **kwargs)
    assert not rebuilt.load_state_dict(state, strict=False).unexpected_keys
    source = _fresh("umae_swin_pico_128", 1)
    path = _save(_released_ummae_swin(source), tmp_path)
    with pytest.raises(CheckpointError, match="--random-init MODEL --init"):
        load_encoder_source(path)
    state, name, _ = load_encoder_source(random_init="umae_swin_pico_128", init=path)
    assert torch.equal(state["stages.1.blocks.0.attn.qkv.weight"], source.encoder.stages[1].blocks[0].attn.qkv.weight)
