"""The boxes of keyframes, from the proposals to the cache writer: one ragged container, numpy only.

Shape legend: K keyframes, M boxes (of all K keyframes), C classes (80). Box convention: see ``cache/schema.py``.

``pipeline.ava.proposals`` builds it from the AVA box files (many videos), the split index saves and loads it
(``columns``, ``from_columns``), extraction takes one video's keyframes from it (``for_keyframes``) and
``cache.writer.VideoWriter`` stores those. Sources are ``cache.schema.SOURCE_GT`` and ``SOURCE_DET``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from cache.schema import NUM_CLASSES, SOURCE_DET, SOURCE_GT

__all__ = ["SOURCE_DET", "SOURCE_GT", "KeyframeBoxes"]

_DTYPES = {
    "video_ids": object,
    "timestamps": np.int64,
    "offsets": np.int64,
    "boxes": np.float32,
    "source": np.uint8,
    "score": np.float32,
    "person_id": np.int32,
    "labels": np.uint8,
}


@dataclass(frozen=True, eq=False)
class KeyframeBoxes:
    """The boxes of K keyframes, ragged: keyframe k owns rows ``offsets[k]:offsets[k+1]`` of every per-box array.

    - ``video_ids`` (K,) str (an object array) and ``timestamps`` (K,) int64 seconds name the keyframes;
    - ``offsets`` (K + 1,) int64: from 0, non-decreasing, to M;
    - ``boxes`` (M, 4) float32: normalised x1 y1 x2 y2 in [0, 1], x1 <= x2, y1 <= y2;
    - ``source`` (M,) uint8: ``SOURCE_GT`` (also a detector box that repeats a ground-truth box) or ``SOURCE_DET``;
    - ``score`` (M,) float32: the detector score, 1.0 for ground truth; ``person_id`` (M,) int32, -1 when unknown;
    - ``labels`` (M, C) uint8: multi-hot of action ids 1..80 (column ``id - 1``).

    The arrays are converted to these dtypes (no copy when they have them already); a shape or a value that breaks
    these rules raises ``ValueError``.
    """

    video_ids: np.ndarray
    timestamps: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    source: np.ndarray
    score: np.ndarray
    person_id: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        for name, dtype in _DTYPES.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype))
        k, m = len(self.video_ids), len(self.boxes)
        shapes = {"video_ids": (k,), "timestamps": (k,), "offsets": (k + 1,), "boxes": (m, 4), "source": (m,),
                  "score": (m,), "person_id": (m,), "labels": (m, NUM_CLASSES)}
        for name, want in shapes.items():
            if getattr(self, name).shape != want:
                raise ValueError(f"KeyframeBoxes.{name}: expected shape {want} (K={k} keyframes, M={m} boxes), "
                                 f"got {getattr(self, name).shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != m or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"KeyframeBoxes.offsets must rise from 0 to M={m}, got {self.offsets.tolist()[:8]}...")
        b = self.boxes
        if m and (not np.all(np.isfinite(b)) or b.min() < 0 or b.max() > 1 or np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1])):
            raise ValueError("KeyframeBoxes.boxes: expected finite normalised x1 y1 x2 y2 in [0, 1] with x1 <= x2, y1 <= y2")
        if m and not np.all(np.isin(self.source, (SOURCE_GT, SOURCE_DET))):
            raise ValueError(f"KeyframeBoxes.source: expected {SOURCE_GT} (ground truth) or {SOURCE_DET} (detector)")
        if not np.all(np.isfinite(self.score)):
            raise ValueError("KeyframeBoxes.score: must be finite (1.0 for ground truth)")

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def num_keyframes(self) -> int:
        return len(self.video_ids)

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    @property
    def keys(self) -> list[str]:
        """The keyframes' ``"<video_id>,%04d"`` keys (the official evaluator's, ``pipeline.ava.files.make_key``)."""
        return [f"{v},{int(t):04d}" for v, t in zip(self.video_ids, self.timestamps)]

    def _take(self, video_ids: np.ndarray, timestamps: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> "KeyframeBoxes":
        """Keyframes named (video_ids, timestamps) (K',) that own rows ``starts[k]:ends[k]`` of this table."""
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(starts) else np.zeros(0, np.int64)
        return KeyframeBoxes(
            video_ids=video_ids, timestamps=timestamps,
            offsets=np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
            boxes=self.boxes[rows], source=self.source[rows], score=self.score[rows],
            person_id=self.person_id[rows], labels=self.labels[rows],
        )

    def select(self, keyframes: np.ndarray | Sequence[int]) -> "KeyframeBoxes":
        """The keyframes at positions ``keyframes`` (K',), in that order."""
        keyframes = np.asarray(keyframes, dtype=np.int64)
        return self._take(self.video_ids[keyframes], self.timestamps[keyframes],
                          self.offsets[keyframes], self.offsets[keyframes + 1])

    def for_video(self, video_id: str) -> "KeyframeBoxes":
        """Every keyframe of ``video_id``, in this table's order."""
        return self.select(np.flatnonzero(self.video_ids == video_id))

    def for_keyframes(self, video_id: str, secs: Sequence[int]) -> "KeyframeBoxes":
        """Exactly the keyframes ``secs`` of ``video_id``, in that order: one that this table lacks gets no boxes.

        What extraction writes for a video: every annotated keyframe gets its maps, the ones with proposals their boxes.
        """
        mine = np.flatnonzero(self.video_ids == video_id)
        where = {int(t): int(k) for k, t in zip(mine, self.timestamps[mine])}
        secs = [int(s) for s in secs]
        at = [where.get(s) for s in secs]
        starts = np.array([0 if k is None else self.offsets[k] for k in at], np.int64)
        ends = np.array([0 if k is None else self.offsets[k + 1] for k in at], np.int64)
        return self._take(np.full(len(secs), video_id, object), np.array(secs, np.int64), starts, ends)

    def columns(self) -> dict[str, np.ndarray]:
        """The fields as plain arrays (``video_ids`` as str), for ``np.savez``; ``from_columns`` reads them back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["video_ids"] = out["video_ids"].astype(str)
        return out

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray]) -> "KeyframeBoxes":
        return cls(**{f.name: columns[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def from_keyframes(cls, video_id: str, timestamps: Sequence[int],
                       keyframes: Sequence[Mapping[str, np.ndarray]]) -> "KeyframeBoxes":
        """One video's keyframes ``timestamps`` (K,) from one mapping per keyframe with ``boxes`` (n, 4) and
        ``labels`` (n, C), and optionally ``source``, ``score``, ``person_id`` (n,) (defaults: detector boxes of
        score 1, person id -1)."""
        timestamps = np.asarray(timestamps, np.int64).reshape(-1)
        if len(timestamps) != len(keyframes):
            raise ValueError(f"{video_id}: {len(timestamps)} timestamps for {len(keyframes)} keyframes of boxes")
        counts = [len(np.asarray(k["boxes"]).reshape(-1, 4)) for k in keyframes]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def cat(name, shape, dtype, default):
            parts = [np.asarray(k[name], dtype).reshape((n, *shape)) if name in k else np.full((n, *shape), default, dtype)
                     for k, n in zip(keyframes, counts)]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

        return cls(
            video_ids=np.full(len(timestamps), video_id, object),
            timestamps=timestamps,
            offsets=offsets,
            boxes=cat("boxes", (4,), np.float32, 0),
            source=cat("source", (), np.uint8, SOURCE_DET),
            score=cat("score", (), np.float32, 1.0),
            person_id=cat("person_id", (), np.int32, -1),
            labels=cat("labels", (NUM_CLASSES,), np.uint8, 0),
        )
