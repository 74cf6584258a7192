"""Lightweight transformer decoder of the MAE family (docs/methods.md 2.3)."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import gather_tokens
from mimkit.models._checkpoint import run_blocks
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import mae_init_


class TransformerDecoder(nn.Module):
    """Linear embed -> mask tokens at removed positions -> fixed sin-cos positions -> ViT blocks -> LN -> Linear.

    ``forward(latent, ids_restore)`` takes encoder tokens ``[cls?, visible...]`` in the order given by
    ``ids_restore`` (MAE) and returns one prediction of ``out_dim`` values per grid position.
    """

    grad_checkpointing = False

    def __init__(
        self,
        in_dim: int | None,
        grid: tuple[int, int],
        out_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        cls_token: bool = True,
    ):
        super().__init__()
        self.grid = tuple(grid)
        self.has_cls = cls_token
        self.embed = nn.Linear(in_dim, dim) if in_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid, cls_token=cls_token).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        prefix = 1 if self.has_cls else 0
        n, length = ids_restore.shape
        visible = x[:, prefix:]
        masks = self.mask_token.expand(n, length - visible.shape[1], -1).to(visible.dtype)
        x_ = gather_tokens(torch.cat([visible, masks], dim=1), ids_restore)
        return self.decode(torch.cat([x[:, :prefix], x_], dim=1))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens at every position (N, [1 +] L, dim), mask tokens already in place -> predictions."""
        prefix = 1 if self.has_cls else 0
        x = self.norm(run_blocks(self.blocks, x + self.pos_embed.to(x.dtype), enabled=self.grad_checkpointing))
        return self.pred(x[:, prefix:])


def visible_token_decoder(
    encoder, grid: tuple[int, int], values: int, dim: int, depth: int, heads: int
) -> TransformerDecoder:
    """The MAE decoder behind a VisibleTokenEncoder view ``encoder`` (mimkit/models/interfaces.py): its width and
    class token in, ``values`` predictions per unit of ``grid`` out, MAE's initialization."""
    decoder = TransformerDecoder(encoder.out_dim, grid, values, dim, depth, heads, cls_token=encoder.has_cls)
    mae_init_(decoder)
    return decoder
