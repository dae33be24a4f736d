"""Building blocks of the context heads: positional encodings and the cross-attention block.

Shape legend: B clips, L context tokens (H*W or T_f), Lq query tokens per clip, D width,
H W map height/width, T time steps. A positional encoding returns (L, D) for a grid of L positions.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from heads.config import HeadConfig


def _sine(positions: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    """(L,) float positions -> (L, dim) interleaved sin/cos at geometric frequencies (Transformer)."""
    i = torch.arange(dim // 2, device=positions.device, dtype=torch.float32)
    freq = torch.exp(-math.log(temperature) * 2 * i / dim)  # (dim/2,)
    angle = positions.float()[:, None] * freq[None, :]  # (L, dim/2)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # (L, dim)


class SinePosition1d(nn.Module):
    """Fixed 1D sine encoding of the index t = 0..T-1; exists for any T."""

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        self.dim, self.temperature = dim, temperature

    def forward(self, shape: tuple[int], like: torch.Tensor) -> torch.Tensor:
        """(T,) grid -> (T, D) in ``like``'s dtype and device."""
        t = torch.arange(shape[0], device=like.device)
        return _sine(t, self.dim, self.temperature).to(like.dtype)


class SinePosition2d(nn.Module):
    """Fixed 2D sine encoding (DETR): D/2 channels for the row index, D/2 for the column index.

    Absolute indices, not normalised by the map's extent, so a right/bottom-padded map encodes its real
    positions exactly as the unpadded map does.
    """

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        self.dim, self.temperature = dim, temperature

    def forward(self, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(H, W) grid -> (H*W, D), row-major like ``flatten`` of an (H, W) map."""
        h, w = shape
        rows = _sine(torch.arange(h, device=like.device), self.dim // 2, self.temperature)  # (H, D/2)
        cols = _sine(torch.arange(w, device=like.device), self.dim // 2, self.temperature)  # (W, D/2)
        grid = torch.cat((rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)), dim=-1)  # (H, W, D)
        return grid.reshape(h * w, self.dim).to(like.dtype)  # (H*W, D)

    def at(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 2) fractional (row, col) indices -> (..., D): the encoding of a map position at any point,
        equal to ``forward``'s row for integer points."""
        rows = _sine(points[..., 0].reshape(-1), self.dim // 2, self.temperature)  # (P, D/2)
        cols = _sine(points[..., 1].reshape(-1), self.dim // 2, self.temperature)  # (P, D/2)
        return torch.cat((rows, cols), dim=-1).reshape(*points.shape[:-1], self.dim)  # (..., D)


class LearnedPosition1d(nn.Module):
    """Learned table of ``max_len`` positions, indexed absolutely."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.table = nn.Parameter(torch.empty(max_len, dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, shape: tuple[int], like: torch.Tensor) -> torch.Tensor:
        """(T,) grid -> (T, D)."""
        if shape[0] > self.table.shape[0]:
            raise ValueError(f"{shape[0]} positions exceed the learned table of {self.table.shape[0]} (max_positions)")
        return self.table[: shape[0]].to(like.dtype)


class LearnedPosition2d(nn.Module):
    """Factorised learned rows/columns (DETR's learned variant): D/2 channels each, indexed absolutely."""

    def __init__(self, dim: int, max_size: int):
        super().__init__()
        self.rows = LearnedPosition1d(dim // 2, max_size)
        self.cols = LearnedPosition1d(dim // 2, max_size)

    def forward(self, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """(H, W) grid -> (H*W, D), row-major."""
        h, w = shape
        rows, cols = self.rows((h,), like), self.cols((w,), like)  # (H, D/2), (W, D/2)
        grid = torch.cat((rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)), dim=-1)  # (H, W, D)
        return grid.reshape(h * w, -1)  # (H*W, D)


class NoPosition(nn.Module):
    """No positional information: zeros, so callers add it unconditionally."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Any grid -> (prod(shape), D) zeros."""
        return like.new_zeros(math.prod(shape), self.dim)


def position_1d(kind: str, cfg: HeadConfig, max_len: int) -> nn.Module:
    """The temporal encoding named by ``kind`` ("sine" | "learned" | "none") at width ``cfg.width``."""
    return {
        "sine": lambda: SinePosition1d(cfg.width, cfg.sine_temperature),
        "learned": lambda: LearnedPosition1d(cfg.width, max_len),
        "none": lambda: NoPosition(cfg.width),
    }[kind]()


def position_2d(kind: str, cfg: HeadConfig, max_size: int) -> nn.Module:
    """The 2D encoding named by ``kind`` ("sine" | "learned" | "none") at width ``cfg.width``."""
    return {
        "sine": lambda: SinePosition2d(cfg.width, cfg.sine_temperature),
        "learned": lambda: LearnedPosition2d(cfg.width, max_size),
        "none": lambda: NoPosition(cfg.width),
    }[kind]()


class Pack(Protocol):
    """A layout change of a block's queries: ``pack`` to (B, Lq, D) rows of attention queries, ``unpack`` back."""

    def pack(self, x: torch.Tensor) -> torch.Tensor: ...

    def unpack(self, x: torch.Tensor) -> torch.Tensor: ...


class _Identity:
    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        return x

    unpack = pack


IDENTITY = _Identity()


class FeedForward(nn.Sequential):
    """Linear D -> ffn_ratio*D, activation, dropout, linear back to D."""

    def __init__(self, cfg: HeadConfig):
        hidden = int(round(cfg.width * cfg.ffn_ratio))
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[cfg.activation]
        super().__init__(nn.Linear(cfg.width, hidden), act(), nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.width))


class PreNormCrossAttention(nn.Module):
    """x + Attn(LN(x) + qpos, ctx + pos, ctx); then x + FFN(LN(x)). Queries never attend to each other.

    The caller applies a final LayerNorm after the last pre-norm block.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.n_heads, dropout=cfg.attn_dropout, batch_first=True)
        self.drop_attn = nn.Dropout(cfg.dropout)
        self.norm_ffn = nn.LayerNorm(cfg.width)
        self.ffn = FeedForward(cfg)
        self.drop_ffn = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None,
        qpos: torch.Tensor | None = None, pack: Pack | None = None,
    ) -> torch.Tensor:
        """x (B, Lq, D) queries, ctx (B, L, D) context, pos (L, D) key positions, pad (B, L) True = ignore,
        qpos (B, Lq, D) query positions in the keys' frame, or None.

        ``pack``: x is in another layout, ``pack.pack`` takes it to (B, Lq, D) rows of queries and ``pack.unpack``
        back (``heads.packing.ClipPacking``: one row per clip, padded). Only the attention then sees the padded
        rows; the per-token rest (norms, FFN, dropout) runs on the real tokens. qpos is in the packed layout.

        Returns x's layout.
        """
        pack = pack or IDENTITY
        q = pack.pack(self.norm_attn(x))
        q = q if qpos is None else q + qpos
        a, _ = self.attn(q, ctx + pos, ctx, key_padding_mask=pad, need_weights=False)
        x = x + self.drop_attn(pack.unpack(a))
        return x + self.drop_ffn(self.ffn(self.norm_ffn(x)))


class PostNormCrossAttention(nn.Module):
    """LN(x + Attn(x + qpos, ctx + pos, ctx)); then LN(x + FFN(x)) (the original Transformer placement)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.width, cfg.n_heads, dropout=cfg.attn_dropout, batch_first=True)
        self.drop_attn = nn.Dropout(cfg.dropout)
        self.norm_attn = nn.LayerNorm(cfg.width)
        self.ffn = FeedForward(cfg)
        self.drop_ffn = nn.Dropout(cfg.dropout)
        self.norm_ffn = nn.LayerNorm(cfg.width)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None,
        qpos: torch.Tensor | None = None, pack: Pack | None = None,
    ) -> torch.Tensor:
        """Same contract as ``PreNormCrossAttention.forward``."""
        pack = pack or IDENTITY
        q = pack.pack(x)
        a, _ = self.attn(q if qpos is None else q + qpos, ctx + pos, ctx, key_padding_mask=pad, need_weights=False)
        x = self.norm_attn(x + self.drop_attn(pack.unpack(a)))
        return self.norm_ffn(x + self.drop_ffn(self.ffn(x)))


def cross_attention_block(cfg: HeadConfig) -> nn.Module:
    """The block class for ``cfg.norm``."""
    return {"pre": PreNormCrossAttention, "post": PostNormCrossAttention}[cfg.norm](cfg)


# The name the issue and DESIGN.md use for the block at the default (pre-norm) placement.
CrossAttentionBlock = PreNormCrossAttention
