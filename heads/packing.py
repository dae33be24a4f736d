"""The boxes of each clip packed into one query sequence and back: a clip's boxes attend to (or over) that clip's
context once, never one copy of it per box.

Shape legend: N boxes, B clips, Q tokens per box, M most boxes in one clip, D width, H W map height/width.
"""

from __future__ import annotations

import torch


def key_padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, H, W) validity -> (B, H*W) key_padding_mask (True = ignore), or None when all positions are real."""
    return None if valid is None else ~valid.flatten(1)  # (B, H*W)


def pack_by_clip(x: torch.Tensor, box_clip: torch.Tensor, num_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group per-box tokens by clip: x (N, Q, D), box_clip (N,) -> packed (B, M*Q, D) and slot (N,).

    Box n lands in row ``slot[n]`` of the (B*M, Q, D) view; unused slots are zeros (their outputs are
    dropped by ``unpack_by_clip``). Costs one host sync for M.
    """
    n, q, d = x.shape
    counts = torch.bincount(box_clip, minlength=num_clips)  # (B,) or longer if box_clip is out of range
    if counts.numel() != num_clips:
        raise ValueError(f"box_clip holds clip index {counts.numel() - 1} but the batch has {num_clips} clips")
    m = max(int(counts.max()), 1)
    order = torch.argsort(box_clip, stable=True)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (B,) first sorted position of each clip
    rank = torch.empty_like(box_clip)
    rank[order] = torch.arange(n, device=x.device) - starts[box_clip[order]]  # (N,) index within its clip
    slot = box_clip * m + rank  # (N,)
    return pack_into(x, slot, num_clips, m), slot  # (B, M*Q, D)


def pack_into(x: torch.Tensor, slot: torch.Tensor, num_clips: int, m: int) -> torch.Tensor:
    """x (N, Q, D) into the slots of ``pack_by_clip`` -> (B, M*Q, D), unused slots zero."""
    n, q, d = x.shape
    return x.new_zeros(num_clips * m, q, d).index_copy(0, slot, x).view(num_clips, m * q, d)


def unpack_by_clip(packed: torch.Tensor, slot: torch.Tensor, q: int) -> torch.Tensor:
    """Inverse of ``pack_by_clip``: packed (B, M*Q, D), slot (N,) -> (N, Q, D)."""
    return packed.reshape(-1, q, packed.shape[-1]).index_select(0, slot)  # (N, Q, D)
