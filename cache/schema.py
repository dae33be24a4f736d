"""The on-disk schema of the feature cache: one file, data only, versioned.

Shape legend: T keyframes of a video, M boxes of a video (all keyframes), C_s/C_f slow/fast channels,
H W res5 map height/width, T_f fast frames, R RoI side (7), K classes (80).

Layout of a store (a directory or an fsspec URL, Zarr v3)::

    <store>/zarr.json                 root group; attrs: schema_version, schema, identity, store_name, provenance
    <store>/videos/<video_id>/        one group per video, written by one task
        sec, box_offsets, boxes, box_source, box_score, labels, person_id, slow, fast, fast_seq, actor, actor_seq
        [slow_scale, slow_offset, fast_scale, fast_offset]      only with uint8 storage
        attrs: video_id, image_hw, map_hw, keyframes, boxes, provenance, ``complete`` (the marker),
        ``committed_to`` (the splits whose manifests list the video, added by each commit), ``split`` and
        ``proposals_sha256`` (what the group was extracted for: its split and a digest of its box arrays), and
        ``writer`` (claim id, worker, host, pid, started, finished; what it replaced)
    <store>/manifests/<split>/        attrs: the committed list of videos of a split, counts, checksums
    <store>/claims/<video_id>/<claim id>.json   who is writing a video now (not zarr metadata; ``cache.claims``)

Box convention (stated here once; everything else refers to it):
    boxes are normalised ``x1 y1 x2 y2`` in [0, 1] of the keyframe, x to the right, y down. For RoIAlign
    they are scaled to pixels of the frame the backbone saw (``image_hw`` = the frame after the
    short-side resize, stored per video), and ``torchvision.ops.roi_align`` maps pixels to the res5 map
    with ``spatial_scale = 1/16``, ``sampling_ratio = 0`` and the ``aligned`` flag of the backbone
    config (stored in the store's identity; ``aligned=True`` shifts pixel centres by -0.5). The one
    implementation of both steps: ``cache.roi``.

What the feature arrays hold (from the res5 maps of a keyframe's clip, ``Fs`` (C_s, T_s, H, W) and ``Ff``
(C_f, T_f, H, W)): ``slow``/``fast`` are ``Fs``/``Ff`` averaged over time, ``fast_seq`` is ``Ff`` averaged over space
(C_f, T_f); per box, ``actor`` is RoIAlign (R x R) of concat(slow, fast), and ``actor_seq`` (C_f, T_f) is RoIAlign of
every fast frame ``Ff[:, t]`` at the box, max-pooled over the R x R grid (the box's own tokens over time, where
``fast_seq`` averages the whole frame). Both use the one RoIAlign of ``cache.roi``. ``actor`` is linear in the stored
maps, so it can be recomputed from them for other boxes; ``actor_seq`` needs the per-frame fast maps, which are not
stored: it exists for the stored boxes only.

Ragged boxes: the boxes of keyframe ``t`` are rows ``box_offsets[t]:box_offsets[t+1]`` of every per-box
array. ``box_source`` is 0 for ground truth (also a detector box that repeats a ground-truth box) and 1
for a detector box (``SOURCE_GT``/``SOURCE_DET``; in memory: ``cache.boxes.KeyframeBoxes``); ``box_score`` is the detector score, 1.0 for
ground truth; ``person_id`` is -1 when unknown; ``labels`` is 80-way multi-hot.

A video group is valid only once its ``complete`` attribute exists: it is written last, after every
chunk, and holds the counts and a CRC-32 of every array's stored bytes in index order. Every chunk and
shard file of the grid is stored, fill values included, so an absent file is always a loss (zarr would
read it as zeros): readers refuse it (``FeatureStore.check_chunks``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Literal, Mapping, get_args

SCHEMA_VERSION = 2
# What each version changed, for the refusal of a store of another version (``cache.store.SchemaVersionError``).
SCHEMA_CHANGES: dict[int, str] = {
    1: "slow, fast, fast_seq maps and actor features",
    2: "adds actor_seq, each box's RoI of every fast frame max-pooled (box, channel_fast, time_fast)",
}

NUM_CLASSES = 80
ROI_SIZE = 7
SPATIAL_SCALE = 1.0 / 16
SAMPLING_RATIO = 0

VIDEOS_GROUP = "videos"
MANIFESTS_GROUP = "manifests"
COMPLETE_ATTR = "complete"
COMMITTED_ATTR = "committed_to"
SPLIT_ATTR = "split"
PROPOSALS_ATTR = "proposals_sha256"
WRITER_ATTR = "writer"
CLAIMS_PREFIX = "claims"  # outside VIDEOS_GROUP: deleting a video group never deletes its claims
CHUNK_KEY_PREFIX = "c"  # zarr v3's "default" chunk key encoding with "/": c/<i>/<j>/...

SOURCE_GT = 0
SOURCE_DET = 1

# The leading dimension of every array says what a row is and how it is chunked.
PER_KEYFRAME = "keyframe"
PER_BOX = "box"

# The storage choices, declared here once: StorageConfig validates against them, tasks and CLIs offer them.
StorageDtype = Literal["float16", "float32", "uint8"]
Compressor = Literal["zstd", "blosc-zstd", "blosc-lz4", "none"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
COMPRESSORS: tuple[str, ...] = get_args(Compressor)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a video group.

    ``dtype`` is a numpy dtype name, or ``"map"`` (the storage dtype: float16, float32 or uint8) or
    ``"feature"`` (float32 with float32 storage, else float16) resolved by ``StorageConfig``.
    ``sharded`` arrays are chunked per row (one keyframe or one box) and sharded; the others are small
    and stored as one chunk.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    sharded: bool = False
    quantised_only: bool = False  # exists only with uint8 storage

    @property
    def per(self) -> str:
        return self.dims[0]


ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        ArraySpec("sec", (PER_KEYFRAME,), "int32"),
        ArraySpec("box_offsets", ("keyframe_edge",), "int64"),  # (T + 1,)
        ArraySpec("boxes", (PER_BOX, "xyxy"), "float32"),
        ArraySpec("box_source", (PER_BOX,), "uint8"),
        ArraySpec("box_score", (PER_BOX,), "float32"),
        ArraySpec("labels", (PER_BOX, "class"), "uint8"),
        ArraySpec("person_id", (PER_BOX,), "int32"),
        ArraySpec("slow", (PER_KEYFRAME, "channel_slow", "height", "width"), "map", sharded=True),
        ArraySpec("fast", (PER_KEYFRAME, "channel_fast", "height", "width"), "map", sharded=True),
        ArraySpec("fast_seq", (PER_KEYFRAME, "channel_fast", "time_fast"), "feature", sharded=True),
        ArraySpec("actor", (PER_BOX, "channel", "roi_y", "roi_x"), "feature", sharded=True),
        ArraySpec("actor_seq", (PER_BOX, "channel_fast", "time_fast"), "feature", sharded=True),
        # uint8 storage: value = q * scale + offset, per keyframe and channel
        ArraySpec("slow_scale", (PER_KEYFRAME, "channel_slow"), "float32", sharded=True, quantised_only=True),
        ArraySpec("slow_offset", (PER_KEYFRAME, "channel_slow"), "float32", sharded=True, quantised_only=True),
        ArraySpec("fast_scale", (PER_KEYFRAME, "channel_fast"), "float32", sharded=True, quantised_only=True),
        ArraySpec("fast_offset", (PER_KEYFRAME, "channel_fast"), "float32", sharded=True, quantised_only=True),
    )
}

BOX_FIELDS: tuple[str, ...] = ("boxes", "box_source", "box_score", "labels", "person_id")
MAP_FIELDS: tuple[str, ...] = ("slow", "fast", "fast_seq")  # one row per keyframe
BOX_FEATURES: tuple[str, ...] = ("actor", "actor_seq")  # one row per box
FEATURE_FIELDS: tuple[str, ...] = (*MAP_FIELDS, *BOX_FEATURES)  # every array that the backbone's maps give
QUANTISED_MAPS: tuple[str, ...] = ("slow", "fast")
# What a reader may ask for; box metadata is always read (it is small).
READABLE_FIELDS: frozenset[str] = frozenset(FEATURE_FIELDS)


def array_shapes(keyframes: int, boxes: int, channels: tuple[int, int, int], map_hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The shape of every array of ``ARRAYS``, from its ``dims``: the one place where a dimension name gets a size.

    ``keyframes`` T and ``boxes`` M of a video group (or B and N of a batch of its rows), ``channels`` =
    (C_s, C_f, T_f), ``map_hw`` = (H, W).
    """
    c_s, c_f, t_f = (int(v) for v in channels)
    h, w = (int(v) for v in map_hw)
    size = {
        PER_KEYFRAME: int(keyframes), "keyframe_edge": int(keyframes) + 1, PER_BOX: int(boxes), "xyxy": 4,
        "class": NUM_CLASSES, "channel_slow": c_s, "channel_fast": c_f, "channel": c_s + c_f,
        "height": h, "width": w, "time_fast": t_f, "roi_y": ROI_SIZE, "roi_x": ROI_SIZE,
    }
    return {spec.name: tuple(size[d] for d in spec.dims) for spec in ARRAYS.values()}


def group_shapes(attrs: Mapping) -> dict[str, tuple[int, ...]]:
    """Every array's shape from the counts and sizes that a video group's attributes record."""
    channels = tuple(attrs["channels"][k] for k in ("slow", "fast", "time_fast"))
    return array_shapes(attrs["keyframes"], attrs["boxes"], channels, attrs["map_hw"])


@dataclass(frozen=True)
class StorageConfig:
    """How maps are stored: part of the extraction config (it changes the store's name).

    ``dtype="uint8"`` quantises ``slow`` and ``fast`` per keyframe and channel (min/max affine);
    ``fast_seq``, ``actor`` and ``actor_seq`` (``"feature"`` arrays) then stay float16. Every chunk also carries a
    CRC-32C.
    """

    dtype: StorageDtype = "float16"
    compressor: Compressor = "zstd"
    level: int = 3
    keyframes_per_shard: int = 16
    boxes_per_shard: int = 64

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"StorageConfig.dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"StorageConfig.compressor must be one of {', '.join(COMPRESSORS)}, got {self.compressor!r}")
        if self.keyframes_per_shard < 1 or self.boxes_per_shard < 1:
            raise ValueError("StorageConfig: keyframes_per_shard and boxes_per_shard must be >= 1")

    def dtype_of(self, spec: ArraySpec) -> str:
        if spec.dtype == "map":
            return self.dtype
        if spec.dtype == "feature":
            return "float32" if self.dtype == "float32" else "float16"
        return spec.dtype

    @property
    def quantised(self) -> bool:
        return self.dtype == "uint8"

    def arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays a video group of this storage holds."""
        return tuple(s for s in ARRAYS.values() if self.quantised or not s.quantised_only)

    def chunking(self, spec: ArraySpec, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """(chunks, shards) of an array: sharded ones one row per chunk and ``*_per_shard`` rows per shard, the
        others one chunk (at least one row, so that zarr accepts an empty array)."""
        if not spec.sharded:
            return tuple(max(n, 1) for n in shape), None
        per_shard = self.keyframes_per_shard if spec.per == PER_KEYFRAME else self.boxes_per_shard
        return (1, *shape[1:]), (per_shard, *shape[1:])

    def file_keys(self, spec: ArraySpec, shape: tuple[int, ...]) -> list[str]:
        """The key (``CHUNK_KEY_PREFIX/3/0/0/0``) of every chunk or shard file of the array's grid: the writer
        stores each one, fill values included, so any absent one was lost."""
        chunks, shards = self.chunking(spec, shape)
        outer = shards or chunks
        grid = [0 if n == 0 else 1 + (n - 1) // c for n, c in zip(shape, outer)]
        return ["/".join((CHUNK_KEY_PREFIX, *map(str, idx))) for idx in itertools.product(*map(range, grid))]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "StorageConfig":
        return cls(**d)


def schema_description() -> dict:
    """The schema as JSON, stored in the root attributes (for humans and for ``cache info``)."""
    return {
        "version": SCHEMA_VERSION,
        "arrays": {
            s.name: {"dims": list(s.dims), "dtype": s.dtype, "sharded": s.sharded, "quantised_only": s.quantised_only}
            for s in ARRAYS.values()
        },
        "boxes": "normalised x1 y1 x2 y2; RoIAlign on pixels of the resized frame (image_hw), "
        f"spatial_scale {SPATIAL_SCALE}, sampling_ratio {SAMPLING_RATIO}, aligned per identity",
        "roi_size": ROI_SIZE,
        "num_classes": NUM_CLASSES,
        "box_source": {"gt": SOURCE_GT, "det": SOURCE_DET},
    }
