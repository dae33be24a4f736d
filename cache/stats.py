"""``stctx cache stats STORE [--split S] [--json]``: what the stored features look like, and what they cost.

Shape legend: T keyframes, M boxes of a video, C channels of an array, H W map, T_f fast frames, R RoI side.

For each feature array (``slow`` (T, C_s, H, W), ``fast`` (T, C_f, H, W), ``fast_seq`` (T, C_f, T_f), ``actor``
(M, C_s + C_f, R, R), ``actor_seq`` (M, C_f, T_f); ``cache.schema.FEATURE_FIELDS``):

- the per-channel mean and standard deviation (population, ddof 0), accumulated in float64, of the values a head
  reads: uint8 maps dequantised ``q * scale + offset`` per keyframe and channel in float32, as
  ``cache.reader.to_device`` does; float16 and float32 values as stored;
- sparsity: the fraction of those values that are exactly zero, over the array and per channel (post-ReLU res5 maps
  are about half zeros in one frame, fewer after time pooling);

and the stored bytes (compressed, as on disk or in the bucket) per keyframe of every array of the schema and of the
whole video groups (their metadata included): the figure that sizes a full-AVA store.

Over every complete video of the store, or with ``--split`` the videos of that split's manifest (``cache.selection``:
a split that is not committed, or a listed video that is incomplete or rewritten since the commit, is refused). The
table gives, per array, the mean over channels of the per-channel mean and std, with their range over channels;
``--json`` gives every channel.

Computed with Dask, as a ``dask.bag`` over videos rather than ``dask.array`` over the zarr arrays: a store is many
ragged arrays (every video has its own number of keyframes and boxes), uint8 maps need their per-keyframe scales
beside them, and a video is the unit that is checked before it is read (``cache.selection.open_video``) and that a
worker can open on its own from the URL. One task per video reads its arrays one shard of rows at a time and returns
per-channel counts, means, sums of squared deviations and zeros, merged pairwise (Chan, Golub and LeVeque: float64
rounding only, and stable where raw sums of squares are not); the graph is one task per video and a tree of merges. Where the
tasks run is ``cache.verify.dask_scheduler``'s choice, as for ``stctx cache verify``: a LocalCluster of worker
processes by default (Dask's threads for a store of few videos), ``--scheduler tcp://HOST:PORT`` for a
``dask.distributed`` cluster (its workers need the store URL's credentials), or one of Dask's single-machine schedulers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import dataclass, field

import numpy as np

from cache.schema import ARRAYS, FEATURE_FIELDS, PER_BOX, QUANTISED_MAPS, VIDEOS_GROUP
from cache.selection import open_video, row_blocks, select_videos
from cache.store import CacheError, FeatureStore, store_errors
from cache.verify import LOCAL, add_scheduler_arguments, dask_scheduler, local_options, stored_sizes

FEATURES: tuple[str, ...] = FEATURE_FIELDS


@dataclass
class Moments:
    """Per-channel count, mean, sum of squared deviations (``m2``) and zeros of some values of one array."""

    count: int  # values per channel
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64
    zeros: np.ndarray  # (C,) int64

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        return cls(0, np.zeros(channels), np.zeros(channels), np.zeros(channels, np.int64))

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """The moments of ``x`` (N, C, ...) over every axis but the channel axis 1."""
        channels = x.shape[1]
        n = x.size // channels if channels else 0
        if n == 0:
            return cls.empty(channels)
        axes = (0, *range(2, x.ndim))
        xs = x.astype(np.float64)
        mean = xs.mean(axis=axes)
        dev = xs - mean.reshape(1, channels, *([1] * (x.ndim - 2)))
        return cls(n, mean, np.square(dev).sum(axis=axes), np.count_nonzero(x == 0, axis=axes).astype(np.int64))

    def merge(self, other: "Moments") -> "Moments":
        if len(self.mean) != len(other.mean):
            raise CacheError(f"videos disagree on channel counts ({len(self.mean)} != {len(other.mean)}); "
                             "run `stctx cache verify`")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * (other.count / n),
                       self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n), self.zeros + other.zeros)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count) if self.count else np.full(len(self.mean), np.nan)


@dataclass
class VideoStats:
    """What one task returns, and what merging them gives: counts, the moments of each feature array, and the
    stored bytes of each array and of the whole groups (``"total"``)."""

    videos: int = 0
    keyframes: int = 0
    boxes: int = 0
    moments: dict[str, Moments] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "VideoStats") -> "VideoStats":
        moments = dict(self.moments)
        for name, m in other.moments.items():
            moments[name] = moments[name].merge(m) if name in moments else m
        nbytes = {k: self.nbytes.get(k, 0) + other.nbytes.get(k, 0) for k in sorted({*self.nbytes, *other.nbytes})}
        return VideoStats(self.videos + other.videos, self.keyframes + other.keyframes, self.boxes + other.boxes,
                          moments, nbytes)


def _merge_all(parts) -> VideoStats:
    return functools.reduce(VideoStats.merge, parts, VideoStats())


def _dequantised(group, name: str, start: int, q: np.ndarray) -> np.ndarray:
    """Rows ``start:start + len(q)`` of a uint8 map as float32 (B, C, H, W): ``q * scale + offset``, as ``to_device``."""
    stop = start + len(q)
    scale = group[f"{name}_scale"][start:stop]  # (B, C)
    offset = group[f"{name}_offset"][start:stop]
    return q.astype(np.float32) * scale[:, :, None, None] + offset[:, :, None, None]


def video_stats(url: str, video_id: str, attrs: dict) -> VideoStats:
    """The statistics of one selected video (``attrs``: its group attributes when selected) of the store at ``url``."""
    with store_errors(url):
        store = FeatureStore.open(url)
        group = open_video(store, video_id, attrs)
        moments = {}
        for name in FEATURES:
            array = group[name]
            acc = Moments.empty(int(array.shape[1]))
            for start, rows in row_blocks(array):
                if store.storage.quantised and name in QUANTISED_MAPS:
                    rows = _dequantised(group, name, start, rows)
                acc = acc.merge(Moments.of(rows))
            moments[name] = acc
        sizes = stored_sizes(store, f"{VIDEOS_GROUP}/{video_id}")
    nbytes = {spec.name: sum(n for k, n in sizes.items() if k.startswith(f"{spec.name}/")) for spec in store.storage.arrays()}
    nbytes["total"] = sum(sizes.values())
    return VideoStats(1, int(attrs["keyframes"]), int(attrs["boxes"]), moments, nbytes)


def _video_task(item: tuple[str, dict], url: str) -> VideoStats:
    return video_stats(url, *item)


@dataclass
class StoreStats:
    url: str
    split: str | None
    videos: int
    keyframes: int
    boxes: int
    features: dict[str, dict]  # name -> dtype, per, channels, values_per_channel, mean, std, zeros (per channel), sparsity
    bytes: dict[str, int]  # per array, and "total" (the video groups)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_keyframe(self) -> dict[str, float | None]:
        return {k: (v / self.keyframes if self.keyframes else None) for k, v in self.bytes.items()}

    def to_dict(self) -> dict:
        return {"url": self.url, "split": self.split, "videos": self.videos, "keyframes": self.keyframes,
                "boxes": self.boxes, "features": self.features, "bytes": self.bytes,
                "bytes_per_keyframe": self.bytes_per_keyframe, "notes": self.notes}


def _floats(x: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64)]


def store_stats(url: str | os.PathLike, *, split: str | None = None, scheduler: str = LOCAL,
                workers: int | None = None) -> StoreStats:
    """Per-channel mean, std and zeros of the feature arrays, and the stored bytes, of a store's videos (every
    complete one, or ``split``'s), one Dask task per video (``scheduler``, ``workers``: ``cache.verify.dask_scheduler``)."""
    import dask.bag as db

    url = os.fspath(url)
    with store_errors(url):
        store = FeatureStore.open(url)
        sel = select_videos(store, split)
    total = VideoStats()
    if sel.videos:
        items = [(v, sel.attrs[v]) for v in sel.videos]
        bag = db.from_sequence(items, npartitions=len(items)).map(_video_task, url=store.url)
        with dask_scheduler(scheduler, tasks=len(items), workers=workers, url=store.url) as sched:
            total = bag.reduction(_merge_all, _merge_all).compute(scheduler=sched, **local_options(sched, workers))
    features = {}
    for name in FEATURES:
        spec = ARRAYS[name]
        m = total.moments.get(name)
        if m is None:
            continue
        channels = len(m.mean)
        features[name] = {
            "dtype": store.storage.dtype_of(spec),
            "dequantised": store.storage.quantised and name in QUANTISED_MAPS,
            "per": "box" if spec.per == PER_BOX else "keyframe",
            "channels": channels,
            "values_per_channel": int(m.count),
            "mean": _floats(m.mean if m.count else np.full(channels, np.nan)),
            "std": _floats(m.std),
            "zeros": _floats(m.zeros / m.count if m.count else np.full(channels, np.nan)),
            "sparsity": float(m.zeros.sum() / (m.count * channels)) if m.count and channels else None,
        }
    return StoreStats(store.url, split, total.videos, total.keyframes, total.boxes, features, dict(total.nbytes),
                      list(sel.notes))


def _summary(values: list[float | None]) -> str:
    v = np.array([np.nan if x is None else x for x in values], np.float64)
    if not len(v) or np.all(np.isnan(v)):
        return "-"
    return f"{np.nanmean(v):.4g} ({np.nanmin(v):.3g}..{np.nanmax(v):.3g})"


def format_stats(s: StoreStats) -> str:
    what = f"split {s.split}" if s.split else "every complete video"
    per_kf = s.bytes_per_keyframe
    lines = [f"store     {s.url}", f"videos    {s.videos} ({what}), {s.keyframes} keyframes, {s.boxes} boxes", "",
             f"{'array':<9} {'dtype':<8} {'C':>5}  {'mean over C (range)':<28} {'std over C (range)':<28} "
             f"{'zeros':>7} {'bytes/keyframe':>15}"]
    for name, f in s.features.items():
        sparsity = "-" if f["sparsity"] is None else f"{100 * f['sparsity']:.1f}%"
        kf = per_kf.get(name)
        dtype = f"{f['dtype']}*" if f["dequantised"] else f["dtype"]
        lines.append(f"{name:<9} {dtype:<8} {f['channels']:>5}  {_summary(f['mean']):<28} {_summary(f['std']):<28} "
                     f"{sparsity:>7} {'-' if kf is None else f'{kf:,.0f}':>15}")
    if any(f["dequantised"] for f in s.features.values()):
        lines.append("* statistics of the dequantised values (q * scale + offset)")
    others = [k for k in s.bytes if k not in s.features and k != "total"]
    if others and s.keyframes:
        lines += ["", "other arrays, bytes/keyframe: " + ", ".join(f"{k} {per_kf[k]:,.0f}" for k in others)]
    if s.keyframes:
        lines.append(f"stored    {s.bytes['total']:,} bytes in the video groups, {per_kf['total']:,.0f} bytes per keyframe "
                     f"({per_kf['total'] / 2**20:.3f} MiB)")
    lines += [f"NOTE {n}" for n in s.notes]
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store directory or fsspec URL (s3://bucket/prefix/<name>.zarr, ...)")
    parser.add_argument("--split", default=None, help="only the videos of this committed split's manifest")
    parser.add_argument("--json", action="store_true", help="print JSON with every channel's numbers")
    add_scheduler_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    """Print the table (or JSON); exit 0. A store that cannot be opened, a split that is not committed or a scheduler
    that does not answer raises (``stctx`` prints it in one line, exit 2)."""
    stats = store_stats(args.store, split=args.split, scheduler=args.scheduler, workers=args.workers)
    print(json.dumps(stats.to_dict(), indent=1) if args.json else format_stats(stats))
    return 0
