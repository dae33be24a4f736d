"""Writing one video group: boxes first, then maps and per-box features batch by batch, the marker last.

Shape legend: T keyframes, M boxes (all keyframes), B keyframes of one batch, N boxes of one batch,
C_s/C_f slow/fast channels, H W map, T_f fast frames, R RoI side, K classes. Box convention: see
``cache/schema.py``.

Keyframes are appended in order, so the writer buffers whole shards (one write per shard, no
read-modify-write) and keeps a running CRC-32 of every array's stored bytes for the marker.

Ownership (``cache.claims``): the writer claims the video before it touches the group, refreshes the claim on every
batch, and before the completion marker checks that the claim and the group are still its own; a writer that lost
its claim raises ``ClaimLostError`` and writes no marker. The group records what it was extracted for (``split``,
``proposals_sha256``: a digest of its box arrays, ``boxes_digest``) and who wrote it (``writer``: claim id, worker,
host, pid, start and finish time, and what it replaced). Files follow the umask: zarr's ``LocalStore`` writes
through ``open()`` and ``mkdir()``, which apply it (``tests/test_cache_claims.py`` checks the modes).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Mapping

import numpy as np
import zarr
import zarr.codecs as zc

from cache.boxes import KeyframeBoxes
from cache.claims import DEFAULT_TTL, Claim, ClaimLostError, claim_video, utc_now
from cache.schema import (
    ARRAYS,
    COMPLETE_ATTR,
    FEATURE_FIELDS,
    PROPOSALS_ATTR,
    QUANTISED_MAPS,
    SPLIT_ATTR,
    VIDEOS_GROUP,
    WRITER_ATTR,
    ArraySpec,
    StorageConfig,
    array_shapes,
)
from cache.store import CacheError, FeatureStore, provenance


class VideoExistsError(FileExistsError):
    """The video group is already complete; delete it first to rewrite it."""


class VideoOriginError(CacheError):
    """A complete video group was extracted for another split or another set of proposal boxes."""


BOX_ARRAYS: tuple[str, ...] = ("sec", "box_offsets", "boxes", "box_source", "box_score", "labels", "person_id")


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


def boxes_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """``sha256:<hex>`` of a video's box arrays (``box_arrays(boxes)``, or those read from its group) in their schema
    dtypes: keyframe seconds, offsets, boxes, sources, scores, labels and person ids. The proposal set a group was
    extracted for: another split's boxes or another threshold give another digest."""
    h = hashlib.sha256()
    for name in BOX_ARRAYS:
        a = np.ascontiguousarray(np.asarray(arrays[name]), dtype=ARRAYS[name].dtype)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data.cast("B") if a.size else b"")
    return f"sha256:{h.hexdigest()}"


def video_origin(store: FeatureStore, video_id: str) -> tuple[dict, dict]:
    """``({"split": ..., "proposals_sha256": ...}, attributes)`` of a complete video group; groups written before
    these attributes existed have no split (None) and get the digest of their stored box arrays."""
    group = store.video(video_id)
    attrs = group.attrs.asdict()
    digest = attrs.get(PROPOSALS_ATTR)
    if digest is None:
        digest = boxes_digest({name: group[name][...] for name in BOX_ARRAYS})
    return {SPLIT_ATTR: attrs.get(SPLIT_ATTR), PROPOSALS_ATTR: digest}, attrs


def check_origin(store: FeatureStore, video_id: str, *, boxes: KeyframeBoxes, split: str | None = None) -> dict:
    """Refuse (``VideoOriginError``) a complete group extracted for another split than ``split`` (when both are
    known) or for other boxes than ``boxes`` (the video's keyframes, as ``VideoWriter`` takes them). Returns the
    group's attributes."""
    origin, attrs = video_origin(store, video_id)
    where = f"{store.url}: video {video_id!r}"
    if split is not None and origin[SPLIT_ATTR] is not None and origin[SPLIT_ATTR] != split:
        raise VideoOriginError(
            f"{where} was extracted for split {origin[SPLIT_ATTR]!r}, not {split!r}: a video of two splits cannot "
            "share one group; extract the other split into a store of its own"
        )
    want = boxes_digest(box_arrays(boxes))
    if origin[PROPOSALS_ATTR] != want:
        raise VideoOriginError(
            f"{where} was extracted with other proposal boxes (digest {origin[PROPOSALS_ATTR][:19]}..., these give "
            f"{want[:19]}...): the annotations, detections or keyframes changed; delete videos/{video_id} to "
            "re-extract it, or extract into a new store"
        )
    return attrs


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
            w.append(slow, fast, fast_seq, actor, actor_seq)
        w.finish()

    ``boxes`` are the video's keyframes (``KeyframeBoxes.for_keyframes``): their ``timestamps`` are the keyframe
    seconds (strictly increasing), every ``video_ids`` entry is ``video_id``. ``split``: recorded in the group (see
    ``check_origin``).

    Ownership: ``claim`` (from ``cache.claims.claim_video``, or taken here with ``ttl`` and ``worker``; a live claim
    of another writer raises ``VideoClaimedError``). The writer owns the claim from then on: it releases it after
    the marker, or on an error here; ``abandon()`` (or leaving a ``with`` block before ``finish()``) releases it
    and leaves the partial group to the next writer. An incomplete group without a live claim (its writer died) is
    deleted here; a complete one raises ``VideoExistsError``.
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
        split: str | None = None,
        claim: Claim | None = None,
        ttl: float = DEFAULT_TTL,
        worker: str | None = None,
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

        if claim is not None and (claim.video_id != video_id or claim.store.url != store.url):
            raise ValueError(f"{video_id}: the claim is of video {claim.video_id!r} in {claim.store.url}")
        self.claim = claim if claim is not None else claim_video(store, video_id, ttl=ttl, worker=worker)
        self.finished = False
        try:
            self._create_group(attributes, split)
        except BaseException:
            self.claim.release()
            raise
        self.keyframes_done = 0
        self.boxes_done = 0

    def _create_group(self, attributes: Mapping | None, split: str | None) -> None:
        store, video_id, boxes = self.store, self.video_id, self.boxes
        self.claim.refresh()
        status = store.video_attrs(video_id)
        if status is not None and COMPLETE_ATTR in status:
            raise VideoExistsError(f"{store.url}: video {video_id!r} is already complete")
        self.claim.delete_partial()  # the claim is ours: whatever is there, a dead writer left it
        small = box_arrays(boxes)
        self.writer = {
            "claim": self.claim.id,
            "worker": self.claim.worker,
            "host": self.claim.record["host"],
            "pid": self.claim.record["pid"],
            "started": utc_now(),
            **({"replaced": list(self.claim.replaced)} if self.claim.replaced else {}),
        }
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
                SPLIT_ATTR: split,
                PROPOSALS_ATTR: boxes_digest(small),
                WRITER_ATTR: self.writer,
                **(dict(attributes) if attributes else {}),
            },
        )
        shapes = array_shapes(self.num_keyframes, boxes.num_boxes, self.channels, self.map_hw)
        self.crc: dict[str, int] = {}
        self.columns: dict[str, _Column] = {}
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

    def append(self, slow, fast, fast_seq, actor, actor_seq) -> None:
        """The next B keyframes: slow (B, C_s, H, W), fast (B, C_f, H, W), fast_seq (B, C_f, T_f), and for exactly
        the boxes of these keyframes, in box-table order, actor (N, C_s + C_f, R, R) and actor_seq (N, C_f, T_f)
        (``cache.roi.actor_features``, ``cache.roi.actor_sequence``). numpy arrays or torch tensors (any float
        dtype, any device)."""
        got = dict(zip(FEATURE_FIELDS, (_as_numpy(x) for x in (slow, fast, fast_seq, actor, actor_seq))))
        # still ours (ClaimLostError if taken over), expiry pushed at most every ttl/4: one small read per batch
        self.claim.refresh(min_interval=self.claim.ttl / 4)
        b = len(got["slow"])
        t0, t1 = self.keyframes_done, self.keyframes_done + b
        if t1 > self.num_keyframes:
            raise ValueError(f"{self.video_id}: appending keyframes {t0}..{t1 - 1} but the video has {self.num_keyframes}")
        n = int(self.boxes.offsets[t1] - self.boxes.offsets[t0])
        want = array_shapes(b, n, self.channels, self.map_hw)
        for name, value in got.items():
            where = f"{self.video_id}: {name} of keyframes {t0}..{t1 - 1}"
            if value.shape != want[name]:
                raise ValueError(f"{where}: expected {want[name]}, got {value.shape}")
            if not _all_finite(value):
                raise ValueError(f"{where} has NaN or Inf")
            # every float16 array, the per-box features of a uint8 store too
            if value.dtype != np.float16 and self.storage.dtype_of(ARRAYS[name]) == "float16" and np.abs(value).max(initial=0) > 65504:
                raise ValueError(f"{where} exceeds the float16 range; store float32")
        if self.storage.quantised:
            for name in QUANTISED_MAPS:
                q, scale, offset = quantise(got[name])
                got[name] = q
                self.columns[f"{name}_scale"].append(scale)
                self.columns[f"{name}_offset"].append(offset)
        for name, value in got.items():
            self.columns[name].append(value)
        self.keyframes_done, self.boxes_done = t1, self.boxes_done + n

    def finish(self) -> dict:
        """Flush the last shards, check that the video is still this writer's, then write the completion marker
        (last) and release the claim. Returns the marker. ``ClaimLostError`` (and no marker) if another writer took
        the video over."""
        if self.keyframes_done != self.num_keyframes:
            raise ValueError(f"{self.video_id}: finish() after {self.keyframes_done} of {self.num_keyframes} keyframes")
        try:
            for name, column in self.columns.items():
                column.close()
                self.crc[name] = column.crc
            self.claim.refresh()
            stored = (self.store.video_attrs(self.video_id) or {}).get(WRITER_ATTR) or {}
            if stored.get("claim") != self.claim.id:
                raise ClaimLostError(
                    f"{self.store.url}: video {self.video_id!r}: the group is no longer this writer's (claim "
                    f"{self.claim.id}) but {stored.get('worker')!r}'s (claim {stored.get('claim')}): no marker written"
                )
        except ClaimLostError:
            self.claim.release()
            raise
        marker = {
            "keyframes": self.num_keyframes,
            "boxes": self.boxes.num_boxes,
            "checksums": {k: f"crc32:{v:08x}" for k, v in sorted(self.crc.items())},
        }
        self.writer = {**self.writer, "finished": utc_now()}
        # one atomic rewrite of the group's zarr.json, after every chunk is in the store
        self.group.update_attributes({WRITER_ATTR: self.writer, COMPLETE_ATTR: marker})
        self.finished = True
        self.claim.release()
        return marker

    def abandon(self) -> None:
        """Stop writing: release the claim and leave the incomplete group (the next writer deletes it)."""
        self.claim.release()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.abandon()
