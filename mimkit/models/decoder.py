"""Lightweight transformer decoder of the MAE family (docs/methods.md 2.3)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.masking import gather_tokens
from mimkit.models._checkpoint import run_blocks
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import mae_init_


class DecoderBlock(Block):
    """timm's ViT ``Block`` (the same parameters and state-dict keys) whose forward can stop at some tokens:
    ``forward(x, at)`` is ``forward(x)`` gathered at the tokens ``at`` (N, M), computed with queries, gate, output
    projection, MLP and residuals at those tokens only and keys and values from every token. Going through the
    block's own call keeps the hooks on it working (FSDP's gather of its shards, activation checkpointing)."""

    def forward(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if at is None:
            return super().forward(x)
        attn = self.attn
        y = self.norm1(x)
        n, length, _ = y.shape
        ys = gather_tokens(y, at)
        m, heads, hd = at.shape[1], attn.num_heads, attn.head_dim
        d = heads * hd
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(ys, w[:d], None if b is None else b[:d]).view(n, m, heads, hd).transpose(1, 2)
        kv = F.linear(y, w[d:], None if b is None else b[d:]).view(n, length, 2, heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        drop = attn.attn_drop.p if attn.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=attn.scale)
        o = attn.norm(o.transpose(1, 2).reshape(n, m, d))
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(ys).sigmoid()
        o = attn.proj_drop(attn.proj(o))
        xs = gather_tokens(x, at) + self.drop_path1(self.ls1(o))
        return xs + self.drop_path2(self.ls2(self.mlp(self.norm2(xs))))


class TransformerDecoder(nn.Module):
    """Linear embed -> mask tokens at removed positions -> fixed sin-cos positions -> ViT blocks -> LN -> Linear.

    ``forward(latent, ids_restore)`` takes encoder tokens ``[cls?, visible...]`` in the order given by
    ``ids_restore`` (MAE) and returns one prediction of ``out_dim`` values per grid position; with ``at`` (N, M)
    grid positions, the predictions at those positions only, (N, M, out_dim), for less work (``DecoderBlock``).
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
                DecoderBlock(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(latent)
        prefix = 1 if self.has_cls else 0
        n, length = ids_restore.shape
        visible = x[:, prefix:]
        masks = self.mask_token.expand(n, length - visible.shape[1], -1).to(visible.dtype)
        x_ = gather_tokens(torch.cat([visible, masks], dim=1), ids_restore)
        return self.decode(torch.cat([x[:, :prefix], x_], dim=1), at)

    def decode(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens at every position (N, [1 +] L, dim), mask tokens already in place -> predictions at every
        grid position, or at the positions ``at`` (N, M) only: every block but the last runs on all tokens, the last
        one's queries, MLP and residuals and the head at ``at`` only (keys and values from every token), which is
        what a loss that reads only those positions needs (same loss, same gradients)."""
        prefix = 1 if self.has_cls else 0
        x = x + self.pos_embed.to(x.dtype)
        if at is None:
            x = run_blocks(self.blocks, x, enabled=self.grad_checkpointing)
            return self.pred(self.norm(x)[:, prefix:])
        x = run_blocks(self.blocks[:-1], x, enabled=self.grad_checkpointing)
        last, ids = self.blocks[-1], at + prefix
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(last, x, ids, use_reentrant=False)
        else:
            x = last(x, ids)
        return self.pred(self.norm(x))


def visible_token_decoder(
    encoder, grid: tuple[int, int], values: int, dim: int, depth: int, heads: int
) -> TransformerDecoder:
    """The MAE decoder behind a VisibleTokenEncoder view ``encoder`` (mimkit/models/interfaces.py): its width and
    class token in, ``values`` predictions per unit of ``grid`` out, MAE's initialization."""
    decoder = TransformerDecoder(encoder.out_dim, grid, values, dim, depth, heads, cls_token=encoder.has_cls)
    mae_init_(decoder)
    return decoder
