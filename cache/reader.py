"""Reading the cache for heads: a keyframe dataset, a block sampler, a collate and a device loader.

Shape legend: B keyframes (clips) of a batch, N boxes of a batch, C_s/C_f slow/fast channels,
H W map (padded to the batch maximum), T_f fast frames, R RoI side (7), K classes (80).
Box convention: see ``cache/schema.py``.

Throughput: box metadata of every video is read once, up front (it is small); workers read only the
big arrays a head uses (``fields``), each run of consecutive keyframes of a video in one read per shard
(``CacheDataset.runs``). ``KeyframeBlockSampler`` orders training: blocks of one video's keyframes in one
shard, shuffled, taken in windows of ``mix`` blocks whose keyframes are shuffled together, so a batch mixes
videos while each shard is read within one window (mixed keyframes are mostly runs of one: the cost is in
docs/benchmarks.md, bench:cache-sampler). Batches stay in the storage dtype (float16 or uint8) until
``to_device`` moves them, pinned, to the head's device and converts them there.

A batch (``collate_runs``, then ``to_device``) is a dict whose tensor keys match ``heads.HeadInputs``:
``actor`` (N, C_s + C_f, R, R), ``actor_seq`` (N, C_f, T_f), ``box_clip`` (N,), ``slow`` (B, C_s, H, W),
``fast`` (B, C_f, H, W), ``fast_seq`` (B, C_f, T_f), ``valid`` (B, H, W) (each feature only when read); plus
``labels`` (N, K), ``boxes`` (N, 4), ``box_source``, ``box_score``, ``person_id`` (N,), ``sec`` (B,),
``image_hw``/``map_hw`` (B, 2) and ``video_id`` (list of B str).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from cache.roi import actor_features
from cache.schema import (
    BOX_FEATURES,
    BOX_FIELDS,
    COMPLETE_ATTR,
    FEATURE_FIELDS,
    MAP_FIELDS,
    NUM_CLASSES,
    QUANTISED_MAPS,
    READABLE_FIELDS,
    SOURCE_DET,
    group_shapes,
)
from cache.remote import BOX_META, LocalCache, group_attrs
from cache.shards import RowReader
from cache.store import CacheError, FeatureStore

# proposal_fn(video_id, sec, stored) -> new boxes of that keyframe. ``stored`` and the result map the names
# of BOX_FIELDS to arrays with one row per box; the result needs at least ``boxes`` (n, 4) and ``labels``
# (n, K); missing fields default to detector boxes of score 1 with person id -1.
ProposalFn = Callable[[str, int, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class CacheDataset(Dataset):
    """Keyframes of complete videos of a store; ``__getitems__`` reads contiguous runs in one go.

    - ``split``: read the videos of the split's manifest (and refuse a video rewritten since the commit);
      or ``videos``: these video ids (each must be complete); neither: every complete video.
    - ``fields``: the big arrays to read, a subset of ``READABLE_FIELDS`` (``actor``, ``actor_seq``, ``slow``,
      ``fast``, ``fast_seq``); box metadata (boxes, labels, source, score, person id) is always there. The
      baseline reads ``{"actor"}``.
    - ``proposals``: ``"stored"``, or a callable that returns other boxes per keyframe (jitter, another
      threshold); then the actor features are recomputed on the device from the maps (read for it).
    - ``actor_from_maps``: recompute the actor features from the maps on the device even for stored
      boxes; for heads that read the maps anyway this skips reading about 0.2 MB per box (RoIAlign is
      linear, so the result equals the stored features up to the storage precision).
    - ``actor_seq`` cannot be recomputed (it pools the per-frame fast maps, which are not stored): asking for it
      with other ``proposals`` or with ``actor_from_maps`` raises ``ValueError``.
    - Keyframes without boxes are skipped unless ``keep_empty``.

    Opening lists the chunk files of every video and refuses one that lacks a file of its arrays
    (``FeatureStore.check_chunks``: a missing chunk would read as zeros).

    - ``local_cache``: a local folder for copies of the arrays of a remote store's complete videos (``cache.remote``;
      default: the ``local_cache`` the store was opened with). The arrays this dataset reads are copied there on
      opening, when not already there (with the same check for missing files), and every read is then local (the
      box metadata from one file per video, ``LocalCache.box_meta``); the store's, the manifest's and the groups'
      metadata are still read from the store, the groups' all at once (``group_attrs``).
    """

    def __init__(
        self,
        store: FeatureStore | str | os.PathLike,
        *,
        split: str | None = None,
        videos: Sequence[str] | None = None,
        fields: frozenset[str] = frozenset({"actor"}),
        proposals: str | ProposalFn = "stored",
        keep_empty: bool = False,
        actor_from_maps: bool = False,
        local_cache: str | os.PathLike | None = None,
    ):
        if not isinstance(store, FeatureStore):
            store = FeatureStore.open(store, local_cache=local_cache)
        elif local_cache:
            store = FeatureStore.open(store.url, local_cache=local_cache)
        unknown = set(fields) - READABLE_FIELDS
        if unknown:
            raise ValueError(f"CacheDataset.fields: unknown {sorted(unknown)}; choose from {sorted(READABLE_FIELDS)}")
        if proposals != "stored" and not callable(proposals):
            raise ValueError("CacheDataset.proposals: 'stored' or a callable(video_id, sec, stored_boxes)")
        if "actor_seq" in fields and (callable(proposals) or actor_from_maps):
            what = "other proposals" if callable(proposals) else "actor_from_maps=True"
            raise ValueError(
                f"CacheDataset: fields holds actor_seq, which cannot be recomputed with {what}: it pools every fast "
                "frame at the box, and the cache stores the fast map averaged over time only. Read actor_seq with "
                "proposals='stored' and actor_from_maps=False, or extract a store with those boxes"
            )
        self.url = store.url
        self.identity = store.identity  # record it with anything trained from these features
        self.store_name = store.name
        self.aligned = store.aligned
        self.storage = store.storage
        self.fields = frozenset(fields)
        self.proposals = proposals
        self.recompute = (callable(proposals) or actor_from_maps) and "actor" in self.fields
        # what the workers read: for recomputed actor features, the maps instead of the stored features
        read = set(self.fields)
        if self.recompute:
            read = (read - {"actor"}) | {"slow", "fast"}
        self.read_fields = frozenset(read)

        if split is not None and videos is not None:
            raise ValueError("CacheDataset: give split or videos, not both")
        expected = None
        if split is not None:
            manifest = store.manifest(split)
            if manifest is None:
                raise CacheError(f"{store.url}: split {split!r} has no manifest (not committed)")
            expected = manifest["videos"]
            videos = sorted(expected)
        elif videos is None:
            videos = store.video_ids()
        self.video_ids: list[str] = list(videos)
        self.meta: list[dict] = []
        self.shapes: list[dict[str, tuple[int, ...]]] = []  # every array's shape, per video (``group_shapes``)

        def check_committed(vid: str, attrs: Mapping) -> None:
            if expected is not None and attrs[COMPLETE_ATTR]["checksums"] != expected[vid]["checksums"]:
                raise CacheError(f"{store.url}: video {vid!r} changed after split {split!r} was committed")

        # with a local cache: the groups' attributes from the store, the arrays from local copies (made now if missing)
        cached = group_attrs(store, self.video_ids) if store.local_cache is not None else None
        if cached is not None:
            for vid, attrs in cached.items():
                check_committed(vid, attrs)
            arrays = {*BOX_META, *self.read_fields}
            if self.storage.quantised:
                arrays |= {f"{n}_{p}" for n in QUANTISED_MAPS if n in self.read_fields for p in ("scale", "offset")}
            local = LocalCache(store.local_cache, store)
            folders = local.ensure(cached, arrays)
        self._folders: list | None = None if cached is None else [folders[v] for v in self.video_ids]
        kf_video, kf_t = [], []
        for i, vid in enumerate(self.video_ids):
            if cached is None:
                group = store.video(vid)
                attrs = group.attrs.asdict()
                check_committed(vid, attrs)
                store.check_chunks(vid)  # zarr and the shard reader would read a missing file as zeros
                small = {name: group[name][...] for name in BOX_META}
            else:  # the local copy was checked for missing files when it was made
                attrs = cached[vid]
                small = local.box_meta(vid, attrs)  # one file, made from the copies of BOX_META
            self.shapes.append(group_shapes(attrs))
            meta = {
                "sec": small["sec"],
                "offsets": small["box_offsets"],
                "image_hw": np.asarray(attrs["image_hw"], np.int64),
                "map_hw": np.asarray(attrs["map_hw"], np.int64),
                **{f: small[f] for f in BOX_FIELDS},
            }
            self.meta.append(meta)
            t = np.arange(len(meta["sec"]))
            if not keep_empty:
                t = t[np.diff(meta["offsets"]) > 0]
            kf_video.append(np.full(len(t), i, np.int32))
            kf_t.append(t.astype(np.int32))
        self.kf_video = np.concatenate(kf_video) if kf_video else np.zeros(0, np.int32)
        self.kf_t = np.concatenate(kf_t) if kf_t else np.zeros(0, np.int32)
        self._store: FeatureStore | None = store  # this process reads through the store it opened
        self._arrays: dict | None = {}
        self._pid: int | None = os.getpid()

    def __len__(self) -> int:
        return len(self.kf_video)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = state["_store"] = None  # zarr handles are reopened in each worker
        return state

    def _array(self, video: int, name: str):
        if self._arrays is None or self._pid != os.getpid():
            # local copies need no store: a worker then makes no request to it
            self._store = FeatureStore.open(self.url) if self._folders is None else None
            self._arrays, self._pid = {}, os.getpid()
        key = (video, name)
        if key not in self._arrays:
            if self._folders is None:
                array = self._store.video(self.video_ids[video])[name]
            else:
                array = zarr.open_array(self._folders[video] / name, mode="r")
            self._arrays[key] = (array, RowReader.of(array))
        return self._arrays[key]

    def _rows(self, video: int, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a big array: read straight from the shard files on a local disk (a local store or
        the local cache's copies: ``cache/shards.py``, several times faster), through zarr anywhere else."""
        array, fast = self._array(video, name)
        if fast is None:
            return torch.from_numpy(array[start:stop])
        return torch.from_numpy(fast.read(start, stop))

    def key(self, index: int) -> str:
        v, t = self.kf_video[index], self.kf_t[index]
        return f"{self.video_ids[v]},{int(self.meta[v]['sec'][t]):04d}"

    def runs(self, indices: Sequence[int]) -> list[tuple[int, list[int]]]:
        """Group indices into (video, keyframe list) runs of consecutive keyframes of one video."""
        out: list[tuple[int, list[int]]] = []
        for i in indices:
            v, t = int(self.kf_video[i]), int(self.kf_t[i])
            if out and out[-1][0] == v and out[-1][1][-1] + 1 == t:
                out[-1][1].append(t)
            else:
                out.append((v, [t]))
        return out

    def __getitem__(self, index: int) -> list[dict]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._read_run(v, ts) for v, ts in self.runs(indices)]

    def _read_run(self, v: int, ts: list[int]) -> dict:
        meta = self.meta[v]
        vid = self.video_ids[v]
        t0, t1 = ts[0], ts[-1] + 1
        b0, b1 = int(meta["offsets"][t0]), int(meta["offsets"][t1])
        run = {
            "video_id": [vid] * (t1 - t0),
            "sec": meta["sec"][t0:t1],
            "image_hw": np.broadcast_to(meta["image_hw"], (t1 - t0, 2)),
            "map_hw": np.broadcast_to(meta["map_hw"], (t1 - t0, 2)),
        }
        counts = np.diff(meta["offsets"][t0 : t1 + 1])
        if callable(self.proposals):
            per_kf = []
            for k, t in enumerate(range(t0, t1)):
                a, b = meta["offsets"][t], meta["offsets"][t + 1]
                stored = {f: meta[f][a:b] for f in BOX_FIELDS}
                per_kf.append(_complete_boxes(self.proposals(vid, int(meta["sec"][t]), stored)))
            counts = np.array([len(p["boxes"]) for p in per_kf], np.int64)
            for f in BOX_FIELDS:
                run[f] = np.concatenate([p[f] for p in per_kf]) if per_kf else meta[f][:0]
        else:
            for f in BOX_FIELDS:
                run[f] = meta[f][b0:b1]
        run["box_count"] = counts
        for name in BOX_FEATURES:
            if name in self.read_fields:
                run[name] = self._rows(v, name, b0, b1)
        for name in MAP_FIELDS:
            if name in self.read_fields:
                run[name] = self._rows(v, name, t0, t1)
                if self.storage.quantised and name in QUANTISED_MAPS:
                    run[f"{name}_scale"] = self._rows(v, f"{name}_scale", t0, t1)
                    run[f"{name}_offset"] = self._rows(v, f"{name}_offset", t0, t1)
        return run


def _complete_boxes(p: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    boxes = np.asarray(p["boxes"], np.float32).reshape(-1, 4)
    n = len(boxes)
    defaults = {
        "box_source": np.full(n, SOURCE_DET, np.uint8),
        "box_score": np.ones(n, np.float32),
        "person_id": np.full(n, -1, np.int32),
    }
    out = {"boxes": np.clip(boxes, 0.0, 1.0), "labels": np.asarray(p["labels"], np.uint8).reshape(n, NUM_CLASSES)}
    for k, d in defaults.items():
        out[k] = np.asarray(p[k], d.dtype).reshape(n) if k in p else d
    return out


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; a single part as it is (a shard-aligned block: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _pad_maps(parts: list[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
    """Concatenate (b, C, h, w) parts into (B, C, H, W), right/bottom-padded with zeros."""
    if all(tuple(p.shape[-2:]) == hw for p in parts):
        return _join(parts)
    out = parts[0].new_zeros((sum(len(p) for p in parts), parts[0].shape[1], *hw))
    i = 0
    for p in parts:
        out[i : i + len(p), :, : p.shape[2], : p.shape[3]] = p
        i += len(p)
    return out


def collate_runs(batches: list[list[dict]] | list[dict]) -> dict:
    """Concatenate runs (from ``__getitems__``) into one batch of CPU tensors in the storage dtype."""
    runs: list[dict] = [r for item in batches for r in (item if isinstance(item, list) else [item])]
    cat = lambda k: np.concatenate([r[k] for r in runs])  # noqa: E731
    counts = cat("box_count")
    map_hw = cat("map_hw").astype(np.int64)  # (B, 2)
    # numpy for the small index arrays: tiny torch ops cost more in thread-pool wake-ups than they compute
    batch: dict = {
        "video_id": [v for r in runs for v in r["video_id"]],
        "sec": torch.from_numpy(cat("sec").astype(np.int64)),
        "image_hw": torch.from_numpy(cat("image_hw").astype(np.int64)),
        "map_hw": torch.from_numpy(map_hw),
        "box_clip": torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int64), counts)),
    }
    for f in BOX_FIELDS:
        batch[f] = torch.from_numpy(cat(f))
    for name in BOX_FEATURES:
        if name in runs[0]:
            batch[name] = _join([r[name] for r in runs])
    hw = tuple(int(v) for v in map_hw.max(axis=0)) if len(map_hw) else (0, 0)
    for name in ("slow", "fast"):
        if name in runs[0]:
            batch[name] = _pad_maps([r[name] for r in runs], hw)
            if f"{name}_scale" in runs[0]:
                batch[f"{name}_scale"] = _join([r[f"{name}_scale"] for r in runs])
                batch[f"{name}_offset"] = _join([r[f"{name}_offset"] for r in runs])
    if "fast_seq" in runs[0]:
        batch["fast_seq"] = _join([r["fast_seq"] for r in runs])
    if "slow" in batch or "fast" in batch:
        rows = np.arange(hw[0])[None, :, None] < map_hw[:, 0, None, None]  # (B, H, 1)
        cols = np.arange(hw[1])[None, None, :] < map_hw[:, 1, None, None]  # (B, 1, W)
        batch["valid"] = torch.from_numpy(rows & cols)  # (B, H, W)
    return batch


def to_device(
    batch: dict,
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.float32,
    aligned: bool = False,
    fields: frozenset[str] | None = None,
    non_blocking: bool = True,
) -> dict:
    """Move a collated batch to ``device`` and convert there: dequantise uint8 maps, cast features to
    ``dtype``, compute missing actor features by RoIAlign (``cache.roi.actor_features``, ``aligned`` from the store), and drop maps
    that were read only for that (``fields``: what the head asked for)."""
    device = torch.device(device)
    out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for name in QUANTISED_MAPS:
        if f"{name}_scale" in out:
            scale, offset = out.pop(f"{name}_scale"), out.pop(f"{name}_offset")
            out[name] = out[name].to(dtype) * scale[:, :, None, None].to(dtype) + offset[:, :, None, None].to(dtype)
            out[name] = out[name] * out["valid"][:, None].to(dtype)  # padding stays zero
    for name in FEATURE_FIELDS:
        if name in out:
            out[name] = out[name].to(dtype)
    out["labels"] = out["labels"].to(dtype)
    if "actor" not in out and (fields is None or "actor" in fields) and "slow" in out and "fast" in out:
        out["actor"] = actor_features(
            out["slow"], out["fast"], out["boxes"], out["box_clip"], out["image_hw"], aligned, out["map_hw"]
        )
    if fields is not None:
        for name in MAP_FIELDS:
            if name in out and name not in fields:
                del out[name]
        if not ({"slow", "fast"} & set(fields)):
            out.pop("valid", None)
    return out


# Blocks per window of ``KeyframeBlockSampler``, by measurement (``benchmarks/bench_cache.py --sampler``): reading a
# mixed batch costs about the same for every window of 4 or more blocks (each of its keyframes is then its own run),
# and a window of 16 blocks puts about 10 videos in a batch of 16 on an AVA-sized split (8 blocks: about 7).
MIX = 16


class KeyframeBlockSampler(Sampler[int]):
    """Yields every dataset index once per epoch, from blocks of consecutive keyframes of one video that are
    aligned to shards (``block`` keyframes, default the store's ``keyframes_per_shard``).

    With ``shuffle``, each epoch (``set_epoch``; the order depends on ``(seed, epoch)`` only) shuffles the blocks,
    takes them in windows of ``mix`` blocks and shuffles the keyframes inside each window: a batch cut from the
    stream then holds keyframes of up to ``mix`` blocks (mostly as many videos), and each block is still read within
    one window, so its shard's reads stay close in time. ``mix=1``: whole blocks, each in time order.
    Without ``shuffle``: dataset order (every video's keyframes in time order).
    """

    def __init__(self, dataset: CacheDataset, *, block: int | None = None, shuffle: bool = True, seed: int = 0,
                 mix: int = MIX):
        if mix < 1:
            raise ValueError(f"KeyframeBlockSampler.mix must be >= 1, got {mix}")
        self.block = block or dataset.storage.keyframes_per_shard
        self.shuffle, self.seed, self.mix, self.epoch = shuffle, seed, mix, 0
        # a block = the dataset indices of one video whose keyframe falls into one shard
        key = dataset.kf_video.astype(np.int64) * (1 << 32) + dataset.kf_t // self.block
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
        self.blocks = np.split(np.arange(len(key)), starts[1:]) if len(key) else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    def windows(self) -> list[np.ndarray]:
        """This epoch's windows in order, each the dataset indices it yields, in the order it yields them."""
        if not self.shuffle:
            return [np.arange(len(self))]
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.blocks))
        # the fewest windows of at most mix blocks, of equal sizes give or take one: no short last window that mixes less
        windows = np.array_split(order, -(-len(order) // self.mix)) if len(order) else []
        out = []
        for w in windows:
            window = np.concatenate([self.blocks[i] for i in w])
            out.append(rng.permutation(window) if self.mix > 1 else window)  # mix=1: the block order alone
        return out

    def __iter__(self) -> Iterator[int]:
        for window in self.windows():
            yield from window.tolist()


class DeviceLoader:
    """Iterates a DataLoader over a ``CacheDataset`` and yields batches on the head's device."""

    def __init__(self, loader: DataLoader, dataset: CacheDataset, device: torch.device, dtype: torch.dtype):
        self.loader, self.dataset, self.device, self.dtype = loader, dataset, device, dtype

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield to_device(batch, self.device, dtype=self.dtype, aligned=self.dataset.aligned, fields=self.dataset.fields)


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode (zarr's own threads); torch intra-op threads would oversubscribe


def make_loader(
    dataset: CacheDataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 2,
    prefetch_factor: int = 4,
    drop_last: bool = False,
    block: int | None = None,
    mix: int = MIX,
) -> DeviceLoader:
    """Batches of ``batch_size`` keyframes on ``device``, in ``KeyframeBlockSampler``'s order (``block``, ``mix``;
    with ``shuffle``, batches mix up to ``mix`` shard blocks): reads in ``num_workers`` processes, pinned memory
    when the device is CUDA, conversion to ``dtype`` on the device."""
    device = torch.device(device)
    sampler = KeyframeBlockSampler(dataset, block=block, shuffle=shuffle, seed=seed, mix=mix)
    loader = DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last),
        collate_fn=collate_runs,
        num_workers=num_workers,
        worker_init_fn=_single_thread_worker if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return DeviceLoader(loader, dataset, device, dtype)
