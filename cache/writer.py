"""Writing one video group: boxes first, then maps and actor features batch by batch, the marker last.

Shape legend: T keyframes, M boxes (all keyframes), B keyframes of one batch, N boxes of one batch,
C_s/C_f slow/fast channels, H W map, T_f fast frames, R RoI side, K classes. Box convention: see
``cache/schema.py``.

Keyframes are appended in order, so the writer buffers whole shards (one write per shard, no
read-modify-write) and keeps a running CRC-32 of every array's stored bytes for the marker.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np
import zarr
import zarr.codecs as zc

from cache.boxes import KeyframeBoxes
from cache.schema import (
    ARRAYS,
    COMPLETE_ATTR,
    QUANTISED_MAPS,
    VIDEOS_GROUP,
    ArraySpec,
    StorageConfig,
    array_shapes,
)
from cache.store import FeatureStore, provenance


class VideoExistsError(FileExistsError):
    """The video group is already complete; delete it first to rewrite it."""


def box_arrays(boxes: KeyframeBoxes) -> dict[str, np.ndarray]:
    """The stored per-keyframe and per-box arrays of a video's boxes (names of ``cache.schema.ARRAYS``)."""
    return {
        "sec": boxes.timestamps.astype(np.int32),
        "box_offsets": boxes.offsets,
        "boxes": boxes.boxes,
        "box_source": boxes.source,
        "box_score": boxes.score,
        "labels": boxes.labels,
        "person_id": boxes.person_id,
    }


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

        w = VideoWriter(store, vid, boxes=boxes, image_hw=(256, 455), map_hw=(16, 29), channels=(C_s, C_f, T_f))
        for batch in batches:            # keyframes in order
            w.append(slow, fast, fast_seq, actor)
        w.finish()

    ``boxes`` are the video's keyframes (``KeyframeBoxes.for_keyframes``): their ``timestamps`` are the keyframe
    seconds (strictly increasing), every ``video_ids`` entry is ``video_id``. An incomplete group left by a dead
    writer is deleted here; a complete one raises ``VideoExistsError``.
    """

    def __init__(
        self,
        store: FeatureStore,
        video_id: str,
        *,
        boxes: KeyframeBoxes,
        image_hw: tuple[int, int],
        map_hw: tuple[int, int],
        channels: tuple[int, int, int],
        attributes: Mapping | None = None,
    ):
        self.store = store
        self.video_id = video_id
        self.storage: StorageConfig = store.storage
        secs = boxes.timestamps
        if np.any(boxes.video_ids != video_id):
            raise ValueError(f"{video_id}: the boxes are of videos {sorted(set(boxes.video_ids) - {video_id})[:5]} too")
        if len(secs) and np.any(np.diff(secs) <= 0):
            raise ValueError(f"{video_id}: keyframe seconds must be strictly increasing, got {secs.tolist()[:8]}...")
        self.num_keyframes = len(secs)
        self.boxes = boxes
        self.map_hw = tuple(int(v) for v in map_hw)
        self.image_hw = tuple(int(v) for v in image_hw)
        self.channels = tuple(int(v) for v in channels)

        status = store.video_attrs(video_id)
        if status is not None and COMPLETE_ATTR in status:
            raise VideoExistsError(f"{store.url}: video {video_id!r} is already complete")
        store.delete_video(video_id)  # whatever a dead writer left
        c_s, c_f, t_f = self.channels
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
        shapes = array_shapes(self.num_keyframes, boxes.num_boxes, self.channels, self.map_hw)
        self.crc: dict[str, int] = {}
        self.columns: dict[str, _Column] = {}
        small = box_arrays(boxes)
        for spec in self.storage.arrays():
            if spec.name in small:
                data = small[spec.name]
                array = self._create(spec, data.shape)
                if data.size:
                    array[...] = data
                self.crc[spec.name] = zlib.crc32(np.ascontiguousarray(data).data.cast("B") if data.size else b"")
            else:
                array = self._create(spec, shapes[spec.name])
                per_shard = self.storage.keyframes_per_shard if spec.per == "keyframe" else self.storage.boxes_per_shard
                self.columns[spec.name] = _Column(array, per_shard)
        self.keyframes_done = 0
        self.boxes_done = 0

    def _create(self, spec: ArraySpec, shape: tuple[int, ...]) -> zarr.Array:
        dtype = self.storage.dtype_of(spec)
        chunks, shards = self.storage.chunking(spec, shape)
        return self.group.create_array(
            spec.name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors(self.storage, dtype),
            dimension_names=spec.dims,
            chunk_key_encoding={"name": "default", "separator": "/"},  # keys as StorageConfig.file_keys says
            fill_value=0,
            config={"write_empty_chunks": True},  # every file of the grid exists: a missing one is a loss
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
        want = array_shapes(b, n, self.channels, self.map_hw)
        got = {"slow": slow, "fast": fast, "fast_seq": fast_seq, "actor": actor}
        for name in got:
            shape = want[name]
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

