"""What every head's forward takes: the actor features and the cached context of their clips.

Shape legend: N boxes, B clips (keyframes), C_s/C_f slow/fast channels, R RoI side (7),
H W map height/width (padded to the batch maximum), T_f fast frames.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# The context fields with one row per clip; ``actor_seq`` is context too, but has one row per box.
CONTEXT_FIELDS: tuple[str, ...] = ("slow", "fast", "fast_seq", "bank")


@dataclass(frozen=True)
class HeadInputs:
    """One batch for a head. Boxes follow the convention stated in the cache schema.

    - ``actor``: (N, C_s + C_f, R, R) RoIAlign of the time-pooled concat(slow, fast) maps, slow channels first.
    - ``box_clip``: (N,) long, the index into B of each box's clip.
    - ``slow``: (B, C_s, H, W) time-pooled slow map, or None when the head does not read it.
    - ``fast``: (B, C_f, H, W) time-pooled fast map, or None.
    - ``fast_seq``: (B, C_f, T_f) space-pooled fast sequence, or None.
    - ``actor_seq``: (N, C_f, T_f) each box's own fast sequence, one row per box like ``actor``: for box n and
      fast frame t, the box's RoI on frame t's fast map, max-pooled over the RoI (the cache computes it); or None.
    - ``valid``: (B, H, W) bool, True where the map is real; maps of clips with other aspect ratios are
      right/bottom-padded to the batch's H, W. None means every position is real.
    - ``box_map``: (N, 4) float, each box's x1 y1 x2 y2 in map cells (pixels times the maps' spatial scale),
      the frame in which map position (row r, col c) covers [c, c + 1) x [r, r + 1). Heads with
      ``query_pos="box"`` read it to place actor queries on the map; None otherwise.
    - ``bank``: (B, L, C_s + C_f) the long-term feature bank of each clip (``cache.bank``: pooled actor features of
      its video's boxes within a window of seconds), padded to the batch's largest L; None unless a head reads it.
    - ``bank_valid``: (B, L) bool, True where a bank entry is real (given with ``bank``).
    """

    actor: torch.Tensor
    box_clip: torch.Tensor
    slow: torch.Tensor | None = None
    fast: torch.Tensor | None = None
    fast_seq: torch.Tensor | None = None
    actor_seq: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    box_map: torch.Tensor | None = None
    bank: torch.Tensor | None = None
    bank_valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.actor.dim() != 4:
            raise ValueError(f"HeadInputs.actor: expected (N, C, R, R), got {tuple(self.actor.shape)}")
        if self.box_clip.shape != self.actor.shape[:1] or self.box_clip.dtype != torch.long:
            raise ValueError(
                f"HeadInputs.box_clip: expected a long tensor of shape ({self.actor.shape[0]},), "
                f"got {self.box_clip.dtype} {tuple(self.box_clip.shape)}"
            )
        if self.box_map is not None and tuple(self.box_map.shape) != (self.actor.shape[0], 4):
            raise ValueError(f"HeadInputs.box_map: expected ({self.actor.shape[0]}, 4), got {tuple(self.box_map.shape)}")
        seq = self.actor_seq
        if seq is not None and (seq.dim() != 3 or seq.shape[0] != self.actor.shape[0]):
            raise ValueError(f"HeadInputs.actor_seq: expected (N, C_f, T_f) with N = {self.actor.shape[0]} boxes "
                             f"(one row per box, like actor), got {tuple(self.actor_seq.shape)}")
        if (self.bank is None) != (self.bank_valid is None):
            raise ValueError("HeadInputs.bank and bank_valid go together")
        if self.bank is not None and (self.bank_valid.shape != self.bank.shape[:2] or self.bank_valid.dtype != torch.bool):
            raise ValueError(f"HeadInputs.bank_valid: expected bool {tuple(self.bank.shape[:2])}, got "
                             f"{self.bank_valid.dtype} {tuple(self.bank_valid.shape)}")
        maps = {"slow": 4, "fast": 4, "fast_seq": 3, "valid": 3, "bank": 3}
        present = {k: getattr(self, k) for k in maps if getattr(self, k) is not None}
        for k, t in present.items():
            if t.dim() != maps[k]:
                raise ValueError(f"HeadInputs.{k}: expected {maps[k]} dims, got {tuple(t.shape)}")
        clips = {k: t.shape[0] for k, t in present.items()}
        if len(set(clips.values())) > 1:
            raise ValueError(f"HeadInputs: clip counts differ between fields: {clips}")
        grids = {k: tuple(t.shape[-2:]) for k, t in present.items() if k in ("slow", "fast", "valid")}
        if len(set(grids.values())) > 1:
            raise ValueError(f"HeadInputs: map sizes (H, W) differ between fields: {grids}")
        if present.get("valid") is not None and present["valid"].dtype != torch.bool:
            raise ValueError(f"HeadInputs.valid: expected bool, got {present['valid'].dtype}")

    @property
    def num_clips(self) -> int | None:
        """B, from the first context field present (None when only actor features are given)."""
        shapes = [getattr(self, k).shape[0] for k in (*CONTEXT_FIELDS, "valid") if getattr(self, k) is not None]
        return shapes[0] if shapes else None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> HeadInputs:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)

    def require(self, name: str) -> torch.Tensor:
        """The field ``name``, or a ValueError saying that the head needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this head reads HeadInputs.{name}, but it is None (see HeadConfig.needs)")
        return value
