"""Start from public weights: the released checkpoints' own layouts mapped onto mimkit's models (``--init``).

Layouts recognised (docs/transfer.md, "Public weights"):

- ``mae``: MAE's released ViT files (``{"model": ...}``; encoder only, or ``*_full`` with the decoder), and UM-MAE's
  ViT files (the same plus ``vis_mask_token``);
- ``timm``: timm ViT encoder weights (``.safetensors`` / ``.pth``; the classifier is ignored);
- ``ummae_swin`` / ``ummae_pvt``: UM-MAE's released Swin / PVT pretraining files (blocks numbered across stages, the
  patch merging inside the first block of a stage, the position-bias MLP as 1x1 convolutions);
- ``simmim_swin``: SimMIM's released Swin files (``encoder.layers.N``, merging at the end of a stage, bias tables),
  onto the Swin of ``simmim_mixswin_*`` (the same Swin v1 layout);
- ``mimkit``: mimkit's own checkpoints and encoder exports.

Every tensor is matched by name and shape; an absolute position embedding of another grid is resampled. The result
is a report of what was loaded, what the model has that the file lacked (new, left at its initialization), and what
the file has that the model does not use (ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.engine.checkpoint import CheckpointError

DECODER_NAMES = {  # MAE-family decoders (MAE, UM-MAE) -> mimkit's TransformerDecoder
    "decoder_embed": "decoder.embed",
    "mask_token": "decoder.mask_token",
    "decoder_norm": "decoder.norm",
    "decoder_pred": "decoder.pred",
}
FIXED = ("decoder_pos_embed",)  # fixed sin-cos tables that mimkit recomputes


@dataclass
class InitReport:
    """What ``--init`` did: the file, its layout and the model keys loaded, new (left at init), ignored (in the
    file, not used) and resampled (position embeddings)."""

    file: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One log line: the layout and the counts."""

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f", ... ({len(keys)})" if len(keys) > 4 else "") if keys else "none"

        return (
            f"--init {self.file} ({self.layout} layout): loaded {len(self.loaded)} tensors; new (kept at their "
            f"initialization) {len(self.new)}: {few(self.new)}; ignored from the file {len(self.ignored)}: "
            f"{few(self.ignored)}" + (f"; resampled: {', '.join(self.resampled)}" if self.resampled else "")
        )

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (``DIR/init-report.json``)."""
        return dict(
            file=self.file,
            layout=self.layout,
            loaded=len(self.loaded),
            new=self.new,
            ignored=self.ignored,
            resampled=self.resampled,
        )


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a torch file holding them directly or under ``model`` /
    ``state_dict`` / ``module``), loaded safely; one-line ``CheckpointError`` otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"--init {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(p))
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"--init {path}: not a readable weights file ({type(err).__name__}: {first})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"--init {path}: holds no mapping of names to tensors (a state dict)")
    return {str(k).removeprefix("module."): v for k, v in raw.items()}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """The released layout a state dict's keys show (``simmim_swin``, ``ummae_swin``, ``ummae_pvt``, ``mae``, ``timm``
    or ``mimkit``)."""
    keys = set(state)
    if any(k.startswith("encoder.layers.") for k in keys):
        return "simmim_swin"
    if any(re.match(r"blocks\.\d+\.attn\.posmlp\.", k) for k in keys):
        return "ummae_swin"
    if any(re.match(r"blocks\.\d+\.attn\.sr\.", k) for k in keys) and "pos_embed" in keys:
        return "ummae_pvt"
    if any(k.startswith(("encoder.", "stages.")) for k in keys):
        return "mimkit"
    if "cls_token" in keys and any(k.startswith("blocks.0.attn.qkv") for k in keys):
        return "mae" if any(k.startswith("decoder_") for k in keys) or "vis_mask_token" in keys else "timm"
    return "unknown"


def _stage_of(depths: list[int]) -> list[tuple[int, int]]:
    """Global block number -> (stage, block in stage)."""
    return [(s, b) for s, d in enumerate(depths) for b in range(d)]


def _depths(model: nn.Module) -> list[int]:
    return [len(stage.blocks) for stage in model.encoder.stages]  # type: ignore[union-attr]


def _decoder_name(key: str) -> str | None:
    """The mimkit name of a MAE-family decoder tensor (MAE, UM-MAE) or of UM-MAE's ``vis_mask_token``; None for
    others."""
    if key.startswith("decoder_blocks."):
        return "decoder.blocks." + key.removeprefix("decoder_blocks.")
    head, _, rest = key.partition(".")
    if head in DECODER_NAMES:
        return DECODER_NAMES[head] + ("." + rest if rest else "")
    return key if key == "vis_mask_token" else None


def _map_mae(state: dict) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for k, v in state.items():
        if (name := _decoder_name(k)) is not None:
            out[k] = (name, v)
        elif not k.startswith(("head.", "fc_norm.")) and k not in FIXED:
            out[k] = ("encoder." + k, v)
    return out


def _map_ummae(state: dict, model: nn.Module, pvt: bool) -> dict[str, tuple[str, torch.Tensor]]:
    where = _stage_of(_depths(model))
    out = {}
    for k, v in state.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            g, rest = int(m.group(1)), m.group(2)
            if g >= len(where):
                continue
            s, b = where[g]
            if rest.startswith("downsample."):
                part = rest.removeprefix("downsample.")
                if pvt:
                    out[k] = (f"encoder.stages.{s}.patch_embed.{part}", v)
                else:
                    out[k] = (f"encoder.stages.{s}.downsample.{part.replace('proj.', 'reduction.')}", v)
                continue
            posmlp = re.match(r"attn\.posmlp\.(0|2)\.(weight|bias)", rest)
            if posmlp:  # 1x1 convolutions of the position-bias MLP -> its Linear layers
                fc = "fc1" if posmlp.group(1) == "0" else "fc2"
                out[k] = (
                    f"encoder.stages.{s}.blocks.{b}.attn.pos_mlp.{fc}.{posmlp.group(2)}",
                    v.flatten(1) if v.ndim == 4 else v,
                )
                continue
            out[k] = (f"encoder.stages.{s}.blocks.{b}.{rest}", v)
        elif k.startswith("patch_embed."):
            out[k] = (("encoder.stages.0." if pvt else "encoder.") + k, v)
        elif k in ("pos_embed", "norm.weight", "norm.bias"):
            out[k] = ("encoder." + k, v)
        elif k.startswith("decoder_embed."):  # before the pixel shuffle: mimkit's to_decoder
            out[k] = ("to_decoder." + k.removeprefix("decoder_embed."), v)
        elif (name := _decoder_name(k)) is not None:
            out[k] = (name, v)
    return out


def _map_simmim_swin(state: dict) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for k, v in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
        if m:
            s, rest = int(m.group(1)), m.group(2)
            if rest.startswith("downsample."):  # Swin v1 merges at the end of a stage; mimkit at the next one's start
                out[k] = (f"encoder.stages.{s + 1}.{rest}", v)
            elif not rest.endswith(("relative_position_index", "attn_mask")):
                out[k] = (f"encoder.stages.{s}.{rest}", v)
        elif k == "encoder.mask_token":
            out[k] = ("mask_token", v.view(1, 1, 1, -1))
        elif k.startswith("decoder.0."):  # the 1x1 convolution before the pixel shuffle -> mimkit's head
            out[k] = ("head." + k.removeprefix("decoder.0."), v.flatten(1) if v.ndim == 4 else v)
        elif k.startswith("encoder.") and not k.startswith("encoder.head."):
            out[k] = (k, v)
    return out


def _resample(name: str, value: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """An absolute position embedding of another grid, resampled bicubically to ``target``'s; None otherwise."""
    if not name.endswith("pos_embed") or value.ndim != 3 or value.shape[-1] != target.shape[-1]:
        return None
    from timm.layers import resample_abs_pos_embed

    encoder: Any = model.encoder  # a timm ViT
    prefix = 1 if getattr(encoder, "cls_token", None) is not None else 0
    grid = getattr(encoder, "pos_grid", None) or tuple(encoder.patch_embed.grid_size)
    n_old = value.shape[1] - prefix
    side = int(round(n_old**0.5))
    if side * side != n_old:
        return None
    return resample_abs_pos_embed(value, list(grid), old_size=[side, side], num_prefix_tokens=prefix)


VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def released_vit_encoder(state: dict[str, torch.Tensor], path: str) -> tuple[dict, str, dict]:
    """A released MAE or timm ViT file as (encoder state, timm model name, timm kwargs), the architecture read from
    the tensor shapes (width, patch size, depth, grid); for fine-tuning such a file directly."""
    layout = detect_layout(state)
    if layout not in ("mae", "timm"):
        raise CheckpointError(
            f"{path}: a {layout} file; fine-tune it by naming its architecture: --random-init MODEL --init {path}"
        )
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    name = f"vit_{VIT_SIZES.get(dim, '?')}_patch{patch}_224"
    import timm

    if dim not in VIT_SIZES or not timm.is_model(name):
        raise CheckpointError(f"{path}: a ViT of width {dim}, patch {patch} that timm does not name; use --init")
    kwargs = {"img_size": grid * patch, "depth": depth, "in_chans": state["patch_embed.proj.weight"].shape[1]}
    keep = {k: v for k, v in _map_mae(state).items() if v[0].startswith("encoder.")}
    return {name.removeprefix("encoder."): v for name, v in keep.values()}, name, kwargs


def load_public_weights(model: nn.Module, path: str | Path) -> InitReport:
    """Load ``path`` (any layout above) into ``model`` (a mimkit method) in place; the report says what happened."""
    state = read_state(path)
    layout = detect_layout(state)
    if layout == "mae" or layout == "timm":
        mapped = _map_mae(state)
    elif layout in ("ummae_swin", "ummae_pvt"):
        if not hasattr(getattr(model, "encoder", None), "stages"):
            raise CheckpointError(f"--init {path}: UM-MAE {layout[6:]} weights need a Swin/PVT model, not this one")
        mapped = _map_ummae(state, model, pvt=layout == "ummae_pvt")
    elif layout == "simmim_swin":
        mapped = _map_simmim_swin(state)
    elif layout == "mimkit":
        own = model.state_dict()
        mapped = {k: ((k if k in own else "encoder." + k), v) for k, v in state.items()}
    else:
        raise CheckpointError(
            f"--init {path}: layout not recognised (first keys: {', '.join(list(state)[:4])}); --init takes MAE, "
            "UM-MAE, SimMIM (Swin), timm ViT or mimkit weights (docs/transfer.md)"
        )
    own = model.state_dict()
    report = InitReport(str(path), layout)
    values, wrong = {}, []
    for source, (name, value) in mapped.items():
        if name not in own:
            report.ignored.append(source)
            continue
        if value.shape != own[name].shape:
            fixed = _resample(name, value, own[name], model)
            if fixed is None:
                wrong.append(f"{source} {tuple(value.shape)} -> {name} {tuple(own[name].shape)}")
                continue
            value = fixed
            report.resampled.append(name)
        values[name] = value
        report.loaded.append(name)
    report.ignored += [k for k in state if k not in mapped]
    if wrong:
        raise CheckpointError(
            f"--init {path}: {len(wrong)} tensor(s) do not fit model shapes ({'; '.join(wrong[:3])}); build the "
            "model with the file's architecture (--model, --model-arg window_size=..., encoder_args)"
        )
    if not values:
        raise CheckpointError(f"--init {path}: no tensor of this {layout} file fits the model (names differ)")
    with torch.no_grad():
        for name, value in values.items():
            target = own[name]
            target.copy_(value.to(target.dtype))
    report.new = [k for k in own if k not in values and not k.endswith(("relative_position_index", "attn_mask"))]
    return report
