"""The boxes of each clip packed into one query sequence and back: a clip's boxes attend to (or over) that clip's
context once, never one copy of it per box.

Shape legend: N boxes, B clips, Q tokens per box, M most boxes in one clip, D width, H W map height/width.
"""

from __future__ import annotations

import torch


def key_padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, H, W) validity -> (B, H*W) key_padding_mask (True = ignore), or None when all positions are real."""
    return None if valid is None else ~valid.flatten(1)  # (B, H*W)


def clip_slots(box_clip: torch.Tensor, num_clips: int) -> tuple[torch.Tensor, int]:
    """Where ``pack_by_clip`` puts each box: slot (N,), its row in the (B*M, Q, D) view, and M. Costs one host
    sync for M."""
    counts = torch.bincount(box_clip, minlength=num_clips)  # (B,) or longer if box_clip is out of range
    if counts.numel() != num_clips:
        raise ValueError(f"box_clip holds clip index {counts.numel() - 1} but the batch has {num_clips} clips")
    m = max(int(counts.max()), 1) if len(box_clip) else 1
    order = torch.argsort(box_clip, stable=True)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (B,) first sorted position of each clip
    rank = torch.empty_like(box_clip)
    rank[order] = torch.arange(len(box_clip), device=box_clip.device) - starts[box_clip[order]]  # (N,) index in its clip
    return box_clip * m + rank, m  # (N,)


def pack_by_clip(x: torch.Tensor, box_clip: torch.Tensor, num_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group per-box tokens by clip: x (N, Q, D), box_clip (N,) -> packed (B, M*Q, D) and slot (N,).

    Box n lands in row ``slot[n]`` of the (B*M, Q, D) view; unused slots are zeros (their outputs are
    dropped by ``unpack_by_clip``). Costs one host sync for M.
    """
    slot, m = clip_slots(box_clip, num_clips)
    return pack_into(x, slot, num_clips, m), slot  # (B, M*Q, D)


class ClipPacking:
    """Per-box tokens (N, Q, D) to the padded rows a block's attention reads and back (``heads.blocks.Pack``):
    ``rows`` = B, one row of M*Q queries per clip, or B*M, one row of Q queries per box slot."""

    def __init__(self, slot: torch.Tensor, num_clips: int, m: int, rows: int):
        self.slot, self.num_clips, self.m, self.rows = slot, num_clips, m, rows

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Q, D) -> (rows, L, D), unused slots zero."""
        return pack_into(x, self.slot, self.num_clips, self.m).reshape(self.rows, -1, x.shape[-1])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, L, D) -> (N, Q, D): each box's own queries (Q = rows * L / (B*M))."""
        return unpack_by_clip(x, self.slot, x.shape[0] * x.shape[1] // (self.num_clips * self.m))


def pack_into(x: torch.Tensor, slot: torch.Tensor, num_clips: int, m: int) -> torch.Tensor:
    """x (N, Q, D) into the slots of ``pack_by_clip`` -> (B, M*Q, D), unused slots zero."""
    n, q, d = x.shape
    return x.new_zeros(num_clips * m, q, d).index_copy(0, slot, x).view(num_clips, m * q, d)


def unpack_by_clip(packed: torch.Tensor, slot: torch.Tensor, q: int) -> torch.Tensor:
    """Inverse of ``pack_by_clip``: packed (B, M*Q, D), slot (N,) -> (N, Q, D)."""
    return packed.reshape(-1, q, packed.shape[-1]).index_select(0, slot)  # (N, Q, D)
