"""Writing one video group: boxes first, then maps and actor features batch by batch, the marker last.

Shape legend: T keyframes, M boxes (all keyframes), B keyframes of one batch, N boxes of one batch,
C_s/C_f slow/fast channels, H W map, T_f fast frames, R RoI side, K classes. Box convention: see
``cache/schema.py``.

Keyframes are appended in order, so the writer buffers whole shards (one write per shard, no
read-modify-write) and keeps a running CRC-32 of every array's stored bytes for the marker.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import zarr
import zarr.codecs as zc

from cache.schema import (
    ARRAYS,
    COMPLETE_ATTR,
    NUM_CLASSES,
    QUANTISED_MAPS,
    ROI_SIZE,
    SOURCE_DET,
    SOURCE_GT,
    VIDEOS_GROUP,
    ArraySpec,
    StorageConfig,
)
from cache.store import FeatureStore, provenance


class VideoExistsError(FileExistsError):
    """The video group is already complete; delete it first to rewrite it."""


@dataclass(frozen=True)
class BoxTable:
    """The boxes of one video's keyframes, ragged: keyframe t owns rows ``offsets[t]:offsets[t+1]``.

    - ``offsets``: (T + 1,) int64, starts at 0, non-decreasing.
    - ``boxes``: (M, 4) float32 normalised x1 y1 x2 y2 (convention: ``cache/schema.py``).
    - ``source``: (M,) uint8, 0 ground truth, 1 detector; ``score``: (M,) float32 detector score,
      1.0 for ground truth; ``labels``: (M, K) uint8 multi-hot; ``person_id``: (M,) int32, -1 unknown.
    """

    offsets: np.ndarray
    boxes: np.ndarray
    source: np.ndarray
    score: np.ndarray
    labels: np.ndarray
    person_id: np.ndarray

    def __post_init__(self):
        m = len(self.boxes)
        checks = {
            "offsets": (self.offsets.ndim == 1 and len(self.offsets) >= 1, "(T + 1,)"),
            "boxes": (self.boxes.shape == (m, 4), "(M, 4)"),
            "source": (self.source.shape == (m,), "(M,)"),
            "score": (self.score.shape == (m,), "(M,)"),
            "labels": (self.labels.shape == (m, NUM_CLASSES), f"(M, {NUM_CLASSES})"),
            "person_id": (self.person_id.shape == (m,), "(M,)"),
        }
        for name, (ok, want) in checks.items():
            if not ok:
                raise ValueError(f"BoxTable.{name}: expected shape {want} with M={m}, got {getattr(self, name).shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != m or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"BoxTable.offsets must rise from 0 to M={m}, got {self.offsets.tolist()[:8]}...")
        b = self.boxes
        if m and (not np.all(np.isfinite(b)) or b.min() < 0 or b.max() > 1 or np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1])):
            raise ValueError("BoxTable.boxes: expected finite normalised x1 y1 x2 y2 in [0, 1] with x1 <= x2, y1 <= y2")
        if m and not np.all(np.isin(self.source, (SOURCE_GT, SOURCE_DET))):
            raise ValueError(f"BoxTable.source: expected {SOURCE_GT} (ground truth) or {SOURCE_DET} (detector)")
        if not np.all(np.isfinite(self.score)):
            raise ValueError("BoxTable.score: must be finite (1.0 for ground-truth-only boxes)")

    @property
    def num_keyframes(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "box_offsets": self.offsets.astype(np.int64),
            "boxes": self.boxes.astype(np.float32),
            "box_source": self.source.astype(np.uint8),
            "box_score": self.score.astype(np.float32),
            "labels": self.labels.astype(np.uint8),
            "person_id": self.person_id.astype(np.int32),
        }

    @classmethod
    def from_keyframes(cls, keyframes: Sequence[Mapping[str, np.ndarray]]) -> "BoxTable":
        """From one mapping per keyframe with ``boxes`` (n, 4) and ``labels`` (n, K), and optionally
        ``source`` (n,), ``score`` (n,), ``person_id`` (n,) (defaults: detector boxes of score 1, id -1)."""
        counts = [len(np.asarray(k["boxes"]).reshape(-1, 4)) for k in keyframes]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def cat(name, shape, dtype, default):
            parts = [np.asarray(k[name], dtype).reshape((n, *shape)) if name in k else np.full((n, *shape), default, dtype) for k, n in zip(keyframes, counts)]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

        return cls(
            offsets=offsets,
            boxes=cat("boxes", (4,), np.float32, 0),
            source=cat("source", (), np.uint8, SOURCE_DET),
            score=cat("score", (), np.float32, 1.0),
            labels=cat("labels", (NUM_CLASSES,), np.uint8, 0),
            person_id=cat("person_id", (), np.int32, -1),
        )


def quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, C, H, W) float -> uint8 codes, scale (B, C), offset (B, C) with x ~ q * scale + offset."""
    x = x.astype(np.float32, copy=False)
    lo = x.min(axis=(2, 3))
    hi = x.max(axis=(2, 3))
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    q = np.rint((x - lo[:, :, None, None]) / scale[:, :, None, None])
    return np.clip(q, 0, 255).astype(np.uint8), scale.astype(np.float32), lo.astype(np.float32)


def compressors(storage: StorageConfig, dtype: str) -> list:
    """The bytes-to-bytes codecs of one chunk: the configured compressor, then a CRC-32C of the chunk."""
    itemsize = np.dtype(dtype).itemsize
    shuffle = "bitshuffle" if itemsize == 1 else "shuffle"
    comp = {
        "zstd": lambda: [zc.ZstdCodec(level=storage.level)],
        "blosc-zstd": lambda: [zc.BloscCodec(cname="zstd", clevel=storage.level, shuffle=shuffle, typesize=itemsize)],
        "blosc-lz4": lambda: [zc.BloscCodec(cname="lz4", clevel=storage.level, shuffle=shuffle, typesize=itemsize)],
        "none": lambda: [],
    }[storage.compressor]()
    return [*comp, zc.Crc32cCodec()]


def _all_finite(x: np.ndarray) -> bool:
    if x.dtype == np.float16:  # numpy's float16 arithmetic is emulated: test the exponent bits instead
        return not np.any((x.view(np.uint16) & 0x7C00) == 0x7C00)
    return bool(np.all(np.isfinite(x)))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class _Column:
    """One sharded array being appended to: buffers rows up to a whole shard, CRC of stored bytes."""

    def __init__(self, array: zarr.Array, rows_per_shard: int):
        self.array = array
        self.rows_per_shard = rows_per_shard
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0
        self.crc = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.array.dtype)
        self.crc = zlib.crc32(rows.data.cast("B") if rows.size else b"", self.crc)
        self.buffer.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.rows_per_shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        n = len(data) if final else (len(data) // self.rows_per_shard) * self.rows_per_shard
        if n:
            self.array[self.written : self.written + n] = data[:n]
            self.written += n
        rest = data[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> None:
        self._flush(final=True)


class VideoWriter:
    """Writes the group ``videos/<video_id>`` of a store; it becomes visible only with ``finish()``.

    Example::

        w = store.begin_video(vid, secs=secs, boxes=table, image_hw=(256, 455), map_hw=(16, 29),
                              channels=(C_s, C_f, T_f))
        for batch in batches:            # keyframes in order
            w.append(slow, fast, fast_seq, actor)
        w.finish()

    An incomplete group left by a dead writer is deleted here; a complete one raises ``VideoExistsError``.
    """

    def __init__(
        self,
        store: FeatureStore,
        video_id: str,
        *,
        secs: Sequence[int],
        boxes: BoxTable,
        image_hw: tuple[int, int],
        map_hw: tuple[int, int],
        channels: tuple[int, int, int],
        attributes: Mapping | None = None,
    ):
        self.store = store
        self.video_id = video_id
        self.storage: StorageConfig = store.storage
        secs = np.asarray(secs, dtype=np.int32)
        if secs.ndim != 1 or len(secs) != boxes.num_keyframes:
            raise ValueError(f"{video_id}: {len(secs)} keyframe seconds but the box table has {boxes.num_keyframes} keyframes")
        if len(secs) and np.any(np.diff(secs) <= 0):
            raise ValueError(f"{video_id}: keyframe seconds must be strictly increasing")
        self.num_keyframes = len(secs)
        self.boxes = boxes
        self.map_hw = tuple(int(v) for v in map_hw)
        self.image_hw = tuple(int(v) for v in image_hw)
        self.channels = tuple(int(v) for v in channels)

        status = store._group_attrs(video_id)
        if status is not None and COMPLETE_ATTR in status:
            raise VideoExistsError(f"{store.url}: video {video_id!r} is already complete")
        store.delete_video(video_id)  # whatever a dead writer left
        c_s, c_f, t_f = self.channels
        h, w = self.map_hw
        self.group = store.root.require_group(VIDEOS_GROUP).create_group(
            video_id,
            attributes={
                "video_id": video_id,
                "keyframes": self.num_keyframes,
                "boxes": boxes.num_boxes,
                "image_hw": list(self.image_hw),
                "map_hw": list(self.map_hw),
                "channels": {"slow": c_s, "fast": c_f, "time_fast": t_f},
                "provenance": provenance(),
                **(dict(attributes) if attributes else {}),
            },
        )
        row_shapes = {
            "slow": (c_s, h, w),
            "fast": (c_f, h, w),
            "fast_seq": (c_f, t_f),
            "actor": (c_s + c_f, ROI_SIZE, ROI_SIZE),
            "slow_scale": (c_s,),
            "slow_offset": (c_s,),
            "fast_scale": (c_f,),
            "fast_offset": (c_f,),
        }
        self.crc: dict[str, int] = {}
        self.columns: dict[str, _Column] = {}
        small = {"sec": secs, **boxes.arrays()}
        for spec in self.storage.arrays():
            if spec.name in small:
                data = small[spec.name]
                array = self._create(spec, data.shape)
                if data.size:
                    array[...] = data
                self.crc[spec.name] = zlib.crc32(np.ascontiguousarray(data).data.cast("B") if data.size else b"")
            else:
                rows = self.num_keyframes if spec.per == "keyframe" else boxes.num_boxes
                array = self._create(spec, (rows, *row_shapes[spec.name]))
                per_shard = self.storage.keyframes_per_shard if spec.per == "keyframe" else self.storage.boxes_per_shard
                self.columns[spec.name] = _Column(array, per_shard)
        self.keyframes_done = 0
        self.boxes_done = 0

    def _create(self, spec: ArraySpec, shape: tuple[int, ...]) -> zarr.Array:
        dtype = self.storage.dtype_of(spec)
        if spec.sharded:
            per_shard = self.storage.keyframes_per_shard if spec.per == "keyframe" else self.storage.boxes_per_shard
            chunks = (1, *shape[1:])
            shards = (per_shard, *shape[1:])
        else:
            chunks, shards = tuple(max(n, 1) for n in shape), None
        return self.group.create_array(
            spec.name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors(self.storage, dtype),
            dimension_names=spec.dims,
            fill_value=0,
        )

    def append(self, slow, fast, fast_seq, actor) -> None:
        """The next B keyframes: slow (B, C_s, H, W), fast (B, C_f, H, W), fast_seq (B, C_f, T_f) and
        actor (N, C_s + C_f, R, R) for exactly the boxes of these keyframes, in box-table order.
        numpy arrays or torch tensors (any float dtype, any device)."""
        slow, fast, fast_seq, actor = (_as_numpy(x) for x in (slow, fast, fast_seq, actor))
        b = len(slow)
        t0, t1 = self.keyframes_done, self.keyframes_done + b
        if t1 > self.num_keyframes:
            raise ValueError(f"{self.video_id}: appending keyframes {t0}..{t1 - 1} but the video has {self.num_keyframes}")
        n = int(self.boxes.offsets[t1] - self.boxes.offsets[t0])
        c_s, c_f, t_f = self.channels
        h, w = self.map_hw
        want = {
            "slow": (b, c_s, h, w),
            "fast": (b, c_f, h, w),
            "fast_seq": (b, c_f, t_f),
            "actor": (n, c_s + c_f, ROI_SIZE, ROI_SIZE),
        }
        got = {"slow": slow, "fast": fast, "fast_seq": fast_seq, "actor": actor}
        for name, shape in want.items():
            if got[name].shape != shape:
                raise ValueError(f"{self.video_id}: {name} of keyframes {t0}..{t1 - 1}: expected {shape}, got {got[name].shape}")
            if not _all_finite(got[name]):
                raise ValueError(f"{self.video_id}: {name} of keyframes {t0}..{t1 - 1} has NaN or Inf")
        if self.storage.quantised:
            for name in QUANTISED_MAPS:
                q, scale, offset = quantise(got[name])
                got[name] = q
                self.columns[f"{name}_scale"].append(scale)
                self.columns[f"{name}_offset"].append(offset)
        else:
            for name in got:
                value = got[name]
                if value.dtype != np.float16 and self.storage.dtype_of(ARRAYS[name]) == "float16" and np.abs(value).max(initial=0) > 65504:
                    raise ValueError(f"{self.video_id}: {name} exceeds the float16 range; store float32")
        for name, value in got.items():
            self.columns[name].append(value)
        self.keyframes_done, self.boxes_done = t1, self.boxes_done + n

    def finish(self) -> dict:
        """Flush the last shards, then write the completion marker (last). Returns the marker."""
        if self.keyframes_done != self.num_keyframes:
            raise ValueError(f"{self.video_id}: finish() after {self.keyframes_done} of {self.num_keyframes} keyframes")
        for name, column in self.columns.items():
            column.close()
            self.crc[name] = column.crc
        marker = {
            "keyframes": self.num_keyframes,
            "boxes": self.boxes.num_boxes,
            "checksums": {k: f"crc32:{v:08x}" for k, v in sorted(self.crc.items())},
        }
        # one atomic rewrite of the group's zarr.json, after every chunk is in the store
        self.group.update_attributes({COMPLETE_ATTR: marker})
        return marker

