"""Layers the backbones share (Swin, MixMAE's Swin, PVT, DyViT): windows, relative positions, patch merging and the
pre-norm transformer block with its MLP. One implementation of each; a backbone file holds only what is its own."""

from mimkit.models.layers.block import PreNormBlock, drop_path_rates
from mimkit.models.layers.merge import PatchMerge, PatchMerging, patch_linear
from mimkit.models.layers.mlp import Mlp, linear, set_cpu_linear
from mimkit.models.layers.position import COORD_UNITS, PositionBiasMLP, bias_rows, log_spaced, relative_index
from mimkit.models.layers.windows import window_attention, window_partition, window_reverse

__all__ = [
    "COORD_UNITS",
    "bias_rows",
    "drop_path_rates",
    "PatchMerge",
    "PatchMerging",
    "patch_linear",
    "PositionBiasMLP",
    "PreNormBlock",
    "linear",
    "log_spaced",
    "Mlp",
    "relative_index",
    "set_cpu_linear",
    "window_attention",
    "window_partition",
    "window_reverse",
]
