"""Lightweight transformer decoder of the MAE family (docs/methods.md 2.3)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import flat_rows, gather_tokens
from mimkit.models._checkpoint import run_block
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import mae_init_


def spread(own: torch.Tensor, common: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N, T, C): ``common`` (T, C) at every position of every sample, except ``own`` (N, G, C) at the positions
    ``where`` (N, G). Rows are copied whole (``index_copy_``, as :func:`mimkit.masking.gather_tokens`) into one
    materialized copy of ``common``: ``repeat`` gives new memory, never a view (an in-place copy into a view of it
    would alter ``common``, or, into a view of a clone, make the backward rebuild the whole base)."""
    n, (length, d) = own.shape[0], common.shape
    return common.repeat(n, 1).index_copy_(0, flat_rows(where, length), own.reshape(-1, d)).view(n, length, d)


class DecoderBlock(Block):
    """timm's ViT ``Block`` (the same parameters and state-dict keys) whose forward can stop at some tokens and can
    take the rows every sample shares once.

    ``forward(x, at)`` is ``forward(x)`` gathered at the tokens ``at`` (N, M), computed with queries, gate, output
    projection, MLP and residuals at those tokens only and keys and values from every token.
    ``forward(x, at, shared=(rows, where))`` is the forward of ``spread(x, rows, where)``: the input holds only the
    tokens ``x`` (N, G, D) at the positions ``where`` (N, G), every other position of a sample holds the same row of
    ``rows`` (T, D) (the decoder's mask token plus its position). Those rows go through the first norm and the qkv
    projection once per position rather than once per sample, the costliest shared part of a first decoder block
    (about 3/4 of its rows at MAE's ratio); attention, projection and MLP mix the samples' tokens and run on all.
    Going through the block's own call keeps the hooks on it working (FSDP's gather of its shards, activation
    checkpointing)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        at: torch.Tensor | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if at is None and shared is None:
            return super().forward(x)
        attn: Any = self.attn  # timm's Attention (typed there as a plain Module)
        heads, hd = attn.num_heads, attn.head_dim
        d = heads * hd
        w, b = attn.qkv.weight, attn.qkv.bias
        if shared is None:
            y = self.norm1(x)
            ys = y if at is None else gather_tokens(y, at)
            q = F.linear(ys, w[:d], None if b is None else b[:d])
            kv = F.linear(y, w[d:], None if b is None else b[d:])
        else:
            rows, where = shared
            qkv = spread(attn.qkv(self.norm1(x)), attn.qkv(self.norm1(rows)), where)
            x = spread(x, rows, where)
            q, kv = qkv.split([d, 2 * d], dim=-1)  # one gradient buffer in the backward, not two zero-filled ones
            if at is not None:
                q = gather_tokens(q, at)
            ys = None
        n, length = x.shape[:2]
        m = length if at is None else at.shape[1]
        q = q.reshape(n, m, heads, hd).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.reshape(n, length, 2, heads, hd).unbind(2))  # as SRAttention
        q, k = attn.q_norm(q), attn.k_norm(k)
        drop = attn.attn_drop.p if attn.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=attn.scale)
        o = attn.norm(o.transpose(1, 2).reshape(n, m, d))
        if getattr(attn, "gate", None) is not None:
            if ys is None:
                ys = self.norm1(x) if at is None else gather_tokens(self.norm1(x), at)
            o = o * attn.gate(ys).sigmoid()
        o = attn.proj_drop(attn.proj(o))
        xs = (x if at is None else gather_tokens(x, at)) + self.drop_path1(self.ls1(o))
        return xs + self.drop_path2(self.ls2(self.mlp(self.norm2(xs))))


class TransformerDecoder(nn.Module):
    """Linear embed -> mask tokens at removed positions -> fixed sin-cos positions -> ViT blocks -> LN -> Linear.

    ``forward(latent, where)`` takes encoder tokens ``[cls?, visible...]``, visible token j belonging at grid position
    ``where[:, j]`` (MAE's ``ids_keep``), and returns one prediction of ``out_dim`` values per grid position; with
    ``at`` (N, M) grid positions, the predictions at those positions only, (N, M, out_dim), for less work
    (``DecoderBlock``).
    """

    grad_checkpointing = False
    pos_embed: torch.Tensor

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
        self.grid: tuple[int, int] = (grid[0], grid[1])
        self.has_cls = cls_token
        self.embed = nn.Linear(in_dim, dim) if in_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid, cls_token=cls_token).unsqueeze(0), persistent=False)
        norm: Any = partial(nn.LayerNorm, eps=1e-6)  # timm types norm_layer as a class
        self.blocks = nn.Sequential(
            *[DecoderBlock(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, where: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder tokens take their positions ``where`` (N, G), distinct grid positions; every other position
        holds the mask token plus its position embedding, a row the first block computes once per position
        (``DecoderBlock``'s ``shared``): the same predictions as ``decode`` of the full sequence, for less work."""
        x = self.embed(latent)
        prefix = 1 if self.has_cls else 0
        n = where.shape[0]
        pos = self.pos_embed.to(x.dtype)
        # in the sequence [cls?, grid...]: the class token first, visible token j at grid position where[:, j]
        where = torch.cat([where.new_zeros(n, prefix), where + prefix], dim=1)
        x = x + gather_tokens(pos.expand(n, -1, -1), where)
        return self.run(x, at, (self.mask_token.to(x.dtype) + pos)[0], where)

    def decode(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens at every position (N, [1 +] L, dim), mask tokens already in place -> predictions at every
        grid position, or at the positions ``at`` (N, M) only: every block but the last runs on all tokens, the last
        one's queries, MLP and residuals and the head at ``at`` only (keys and values from every token), which is
        what a loss that reads only those positions needs (same loss, same gradients)."""
        return self.run(x + self.pos_embed.to(x.dtype), at)

    def run(
        self,
        x: torch.Tensor,
        at: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        where: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks, norm and head on position-embedded tokens ``x``: the whole sequence, or (``rows``, ``where``) the
        tokens at ``where`` with ``rows`` everywhere else (``DecoderBlock``)."""
        prefix = 1 if self.has_cls else 0
        shared = None if rows is None or where is None else (rows, where)
        if shared is not None and not len(self.blocks):
            x, shared = spread(x, *shared), None
        ids = None if at is None else at + prefix
        last, enabled = len(self.blocks) - 1, self.grad_checkpointing
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, ids if i == last else None, shared if i == 0 else None, enabled=enabled)
        if ids is not None and not len(self.blocks):
            x = gather_tokens(x, ids)
        x = self.norm(x)
        return self.pred(x if ids is not None else x[:, prefix:])


def visible_token_decoder(
    encoder, grid: tuple[int, int], values: int, dim: int, depth: int, heads: int
) -> TransformerDecoder:
    """The MAE decoder behind a VisibleTokenEncoder view ``encoder`` (mimkit/models/interfaces.py): its width and
    class token in, ``values`` predictions per unit of ``grid`` out, MAE's initialization."""
    decoder = TransformerDecoder(encoder.out_dim, grid, values, dim, depth, heads, cls_token=encoder.has_cls)
    mae_init_(decoder)
    return decoder
