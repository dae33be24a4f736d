"""Feature extraction: run the backbone over one video's keyframe clips and write its cache group.

Shape legend: B clips, N boxes, C_s/C_f slow/fast channels, T_s/T_f slow/fast time, h w res5 map,
R RoI side (7). Box convention: see ``cache/schema.py``.

One call writes one video group (one Luigi task per video). A complete group is never recomputed (but
refused if it was extracted for another split or other proposal boxes); a partial one (a crashed run) is
deleted and rewritten; the group's completion marker is written last, so a killed extraction leaves nothing
that looks complete. The video is claimed first (``cache.claims``): while another run or host writes it, the
call waits, then finds it complete and skips it, or takes it over if that writer died.

Each distinct frame of a video is decoded once (``pipeline.features.clips.VideoClipBatches``) and crosses to the
device once, as uint8; normalisation and the pathways are cut there (``to_model_input``). The checkpoint is read and
hashed once per process (``loaded_backbone``), not once per video.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from cache.boxes import KeyframeBoxes
from cache.claims import DEFAULT_TTL, wait_for_claim
from cache.roi import actor_features, actor_sequence, box_clip_index
from cache.schema import SPLIT_ATTR, Compressor, StorageConfig, StorageDtype
from cache.store import CacheSpec, FeatureStore, local_path, store_errors
from cache.writer import VideoOriginError, VideoWriter, check_origin
from pipeline.ava import files as ava
from pipeline.ava.files import make_key
from pipeline.ava.splits import read_split_index, split_annotations
from pipeline.errors import InputError
from pipeline.features.backbone import BackboneConfig, SlowFastBackbone, pool_maps
from pipeline.features.checkpoints import backbone_from_checkpoint
from pipeline.features.clips import KeyframeClips, VideoClipBatches, to_model_input
from pipeline.features.runtime import resolve_device, torch_settings


@dataclass(frozen=True)
class ExtractionConfig:
    """What, besides the backbone's weights, decides a cache's content (it goes into the store's name).

    ``threshold``: detector score for training proposals (ground truth + detector boxes >= threshold);
    ``eval_threshold``: detector score for the evaluation proposals of the other splits (detector boxes only), 0.8
    as SlowFast and the paper evaluate (``AVA.DETECTION_SCORE_THRESH``). ``batch_size``: clips per backbone call (not significant for the
    values, but the same for everybody to keep float rounding identical).
    """

    threshold: float = 0.8
    eval_threshold: float = 0.8
    dtype: StorageDtype = StorageConfig.dtype  # the storage fields and their defaults: cache.schema.StorageConfig
    compressor: Compressor = StorageConfig.compressor
    level: int = StorageConfig.level
    batch_size: int = 8

    def split_threshold(self, split: str) -> float:
        """The detector score a proposal of ``split`` needs."""
        return self.threshold if split == "train" else self.eval_threshold

    def storage(self) -> StorageConfig:
        return StorageConfig(dtype=self.dtype, compressor=self.compressor, level=self.level)


def cache_spec(checkpoint: str | Path, extraction: ExtractionConfig) -> CacheSpec:
    """The identity of the store that ``checkpoint`` and ``extraction`` produce (the backbone as ``loaded_backbone``
    reads it: our checkpoints carry their config, pytorchvideo's AVA/Kinetics files are the ``r50`` preset)."""
    model, info = loaded_backbone(checkpoint)
    model_cfg = model.cfg
    return CacheSpec(
        backbone_sha256=info["sha256"],
        extraction={"backbone": model_cfg.name, "backbone_config": model_cfg.to_dict(),
                    **{k: v for k, v in dataclasses.asdict(extraction).items() if k not in ("dtype", "compressor", "level")}},
        aligned=model_cfg.aligned,
        storage=extraction.storage(),
    )


# (path, inode, size, mtime_ns) of one checkpoint file, and a device -> (backbone, load_checkpoint info)
_LOADED: dict[tuple, tuple[SlowFastBackbone, dict]] = {}


def loaded_backbone(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[SlowFastBackbone, dict]:
    """The checkpoint's backbone in eval mode on ``device``, and its ``load_checkpoint`` info (``sha256`` included).

    Read and hashed once per process and version of the file (path, inode, size, modification time: our checkpoints
    are written to a temporary file and renamed, a new inode each time), not once per video; forked processes
    (Luigi's parallel workers) inherit what their parent loaded. One file is held at a time, on the CPU and on each
    device asked for. The model is shared between calls: run it, do not train it.
    """
    path = Path(checkpoint).resolve()
    try:
        st = path.stat()
    except OSError:
        model, info = backbone_from_checkpoint(path)  # raises the InputError that names the file
        return model.to(device).eval(), info
    version, device = (str(path), st.st_ino, st.st_size, st.st_mtime_ns), torch.device(device)
    if (version, "cpu") not in _LOADED:
        _LOADED.clear()
        model, info = backbone_from_checkpoint(path)
        _LOADED[version, "cpu"] = (model.eval(), info)
    if (version, str(device)) not in _LOADED:
        model, info = _LOADED[version, "cpu"]
        _LOADED[version, str(device)] = (copy.deepcopy(model).to(device).eval(), info)
    return _LOADED[version, str(device)]


def store_url(root: str | Path, spec: CacheSpec) -> Path:
    """The store of ``spec`` under a run root: ``<root>/cache/<name>.zarr``."""
    return store_location(Path(root) / "cache", spec)


def store_location(cache: str | os.PathLike, spec: CacheSpec) -> str | Path:
    """The store of ``spec`` in the cache folder or URL ``cache``: a Path for a local folder (``file://`` included),
    ``<cache>/<name>.zarr`` as a URL for object storage or any other fsspec URL (``s3://bucket/prefix``)."""
    folder = local_path(cache)
    if folder is not None:
        return folder / f"{spec.name}.zarr"
    return f"{os.fspath(cache).rstrip('/')}/{spec.name}.zarr"


def extract_split_video(data_root: str | Path, split: str, video_id: str, checkpoint: str | Path, url: str | Path,
                        spec: CacheSpec, extraction: ExtractionConfig = ExtractionConfig(),
                        device: str | None = None, num_workers: int | None = None, index: str | Path | None = None,
                        cpu_threads: int | None = 1, worker: str | None = None, claim_ttl: float = DEFAULT_TTL) -> dict:
    """Extract one video of a split into the store at ``url`` (created with ``spec`` if absent).

    ``index``: the split's index folder (``write_split_index``); without it the annotation files and the frame list
    are read here, which on AVA costs seconds per video. ``num_workers``: frame decoding processes
    (``VideoClipBatches``); None: the cores this process may use (``available_cores``) on a GPU, 0 (decoding in this
    process) on a CPU device, where decoding processes take the cores from the backbone (2 cores, docs/benchmarks.md
    "Extraction efficiency": mini 0.53 with none vs 0.42 with 2, r50 0.80 vs 0.76). ``cpu_threads``: torch
    threads on a CPU device; one per task lets Luigi's parallel workers share the cores (two workers with two threads
    each ran the mini-AVA train split 3x slower than one worker), None keeps the caller's count. torch's thread count and random state are the
    caller's again on return. ``worker``, ``claim_ttl``: see ``extract_video``.
    """
    paths = ava.AvaPaths(data_root)
    device = resolve_device(device)
    threads = cpu_threads if device.type == "cpu" else None
    with torch_settings(threads=threads), store_errors(url):
        model, info = loaded_backbone(checkpoint, device)
        if info["sha256"] != spec.backbone_sha256:
            raise InputError(checkpoint, None, f"sha256 {info['sha256'][:16]}... is not the backbone of the store's "
                                               f"spec ({spec.backbone_sha256[:16]}...): the file changed since")
        store = FeatureStore.create(url, spec)
        if index is None:
            proposals, keyframes = split_annotations(data_root, split, extraction.split_threshold(split))
            frame_lists = ava.frames_by_video(ava.read_frame_list(paths.frame_list(split)))
        else:
            proposals, keyframes, frame_lists = read_split_index(index)
        secs = sorted(s for v, s in keyframes if v == video_id)
        if not secs:
            raise ValueError(f"{paths.root}: video {video_id!r} has no keyframe in the {split} annotations")
        clips = KeyframeClips.from_config(paths.frames, [(video_id, s) for s in secs], model.cfg, frame_lists)
        if num_workers is None and device.type == "cpu":
            num_workers = 0
        loader = VideoClipBatches(clips, extraction.batch_size, num_workers=num_workers, device=device)
        # extract_video is the one place that finds a complete video and skips it
        return extract_video(model, model.cfg, loader, proposals.for_video(video_id), store, video_id, secs=secs,
                             device=device, split=split, worker=worker, claim_ttl=claim_ttl)


class StageClock:
    """Wall seconds per stage of a loop, added to the dict ``into``; with ``into=None`` it does nothing.

    ``lap(stage)`` adds the time since the previous lap (or since the clock was made) to ``stage``, after waiting
    for the device (``torch.cuda.synchronize``), so the laps add up to the loop's wall time. Because the CPU no
    longer runs ahead of the GPU, a timed run is slower than an untimed one.
    """

    def __init__(self, into: dict[str, float] | None, device: torch.device):
        self.into, self.cuda = into, device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.into is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.into[stage] = self.into.get(stage, 0.0) + now - self.last
        self.last = now

    def timed(self, fn: Callable, stage: str) -> Callable:
        """``fn`` with the seconds of each call added to ``stage``: for work in another thread (not a lap)."""
        if self.into is None:
            return fn

        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.into[stage] = self.into.get(stage, 0.0) + time.perf_counter() - start

        return call


def _video_secs(clips_loader, video_id: str, store: FeatureStore) -> list[int]:
    dataset = getattr(clips_loader, "dataset", None)
    keyframes = getattr(dataset, "keyframes", None)
    if keyframes is None and store.is_complete(video_id):
        return store.video(video_id)["sec"][...].tolist()  # a skip needs no loader: check the stored keyframes' boxes
    if keyframes is None:
        raise ValueError("extract_video: pass secs=..., the clips loader's dataset has no keyframes list")
    return [int(s) for v, s in keyframes if v == video_id]


def extract_video(
    backbone: nn.Module,
    backbone_cfg: BackboneConfig,
    clips_loader: Iterable[dict],
    proposals: KeyframeBoxes,
    store: FeatureStore,
    video_id: str,
    *,
    secs: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    amp: bool = True,
    timings: dict[str, float] | None = None,
    split: str | None = None,
    worker: str | None = None,
    claim_ttl: float = DEFAULT_TTL,
) -> dict:
    """Extract the features of ``video_id`` into ``store`` (opened with ``FeatureStore.create``).

    ``clips_loader`` yields ``pipeline.features.clips.collate_clips`` batches (uint8 or float, ``to_model_input``)
    of this video's keyframes in increasing seconds (``VideoClipBatches``, or ``clip_loader`` over a
    ``KeyframeClips`` of the video, not shuffled); ``secs``
    are those seconds (default: the loader dataset's keyframes of the video). ``proposals`` hold the
    boxes (``pipeline.ava.proposals.training_proposals`` or ``eval_proposals``); a keyframe without any gets its
    maps stored and no boxes. Mixed precision on CUDA when ``amp``.

    ``timings``: a dict to add wall seconds per stage to (``StageClock``: the device is synchronised after each
    stage, which slows the run down): ``first_batch`` waiting for the clips loader's first batch (its workers
    start), ``load`` waiting for the others, ``to_device`` (with uint8 batches: normalising and cutting the
    pathways), ``backbone``, ``pool_roi`` (pooling, and the RoIAligns of ``actor`` and ``actor_seq``), ``to_host``,
    ``write_wait`` (waiting for the writer thread, and the final flush); these add up to the call's time.
    ``write`` is the writer thread's time creating the group and in ``append`` (compression and storage writes),
    overlapping the others.

    ``split``: recorded in the group. ``worker`` (a label, default ``host:pid``) and ``claim_ttl`` (seconds):
    the video's claim (``cache.claims``); while another writer holds a live claim the call waits for it.

    Returns dict(video_id, keyframes, boxes, skipped): ``skipped`` when the group was already complete, or was
    completed by another writer meanwhile (then nothing is computed and the loader is not iterated). A complete
    group extracted for another split or other boxes raises ``VideoOriginError``.
    """
    secs = sorted(int(s) for s in (secs if secs is not None else _video_secs(clips_loader, video_id, store)))
    table = proposals.for_keyframes(video_id, secs)

    def skipped() -> dict:
        attrs = check_origin(store, video_id, boxes=table, split=split)
        return dict(video_id=video_id, keyframes=attrs["keyframes"], boxes=attrs["boxes"], skipped=True)

    if store.is_complete(video_id):
        return skipped()
    if store.aligned != backbone_cfg.aligned:
        raise ValueError(f"{store.url}: the store's RoIAlign aligned={store.aligned}, the backbone's {backbone_cfg.aligned}")
    claim = wait_for_claim(store, video_id, done=lambda: store.is_complete(video_id), ttl=claim_ttl, worker=worker,
                           poll=min(5.0, claim_ttl / 4))
    if claim is None:  # another writer finished it while this one waited
        return skipped()
    try:
        return _extract_claimed(backbone, backbone_cfg, clips_loader, table, store, video_id, secs, device, amp,
                                timings, split, claim)
    finally:
        claim.release()  # a no-op after the marker; after an error it leaves the partial group to the next writer


def _extract_claimed(backbone, backbone_cfg, clips_loader, table, store, video_id, secs, device, amp, timings, split,
                     claim) -> dict:
    """The body of ``extract_video`` once the video is claimed."""
    device = resolve_device(device) if device is not None else next(backbone.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else contextlib.nullcontext()
    # float16 storage: cast on the device (half the copy to the host, no slow numpy conversion)
    to_host = torch.float16 if store.storage.dtype == "float16" else torch.float32
    backbone.eval()
    writer = None
    done = 0
    # write-behind: the previous batch is compressed and written while the GPU computes the next one
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
    pending: Future | None = None
    clock = StageClock(timings, device)
    append = None
    with pool, torch.inference_mode():
        for batch in clips_loader:
            clock.lap("load" if done else "first_batch")
            videos = set(batch["video_id"])
            if videos != {video_id}:
                raise ValueError(f"extract_video({video_id!r}): the loader yields keyframes of {sorted(videos)}")
            batch_secs = [int(s) for s in batch["sec"]]
            if batch_secs != secs[done : done + len(batch_secs)]:
                want = [make_key(video_id, s) for s in secs[done : done + len(batch_secs)]]
                raise ValueError(f"extract_video({video_id!r}): expected keyframes {want} in order, got {batch_secs}")
            h, w = int(batch["height"]), int(batch["width"])
            clip = to_model_input(batch, device, mean=backbone_cfg.mean, std=backbone_cfg.std, alpha=backbone_cfg.alpha)
            clock.lap("to_device")
            with autocast:
                Fs, Ff = backbone(clip)
            clock.lap("backbone")
            Ff = Ff.float()  # (B, C_f, T_f, h, w)
            slow, fast, fast_seq = (x.float() for x in pool_maps(Fs.float(), Ff))  # (B,C_s,h,w) (B,C_f,h,w) (B,C_f,T_f)
            a, b = table.offsets[done], table.offsets[done + len(batch_secs)]
            box_clip = box_clip_index(np.diff(table.offsets[done : done + len(batch_secs) + 1]))  # (N,)
            image_hw = torch.tensor([(h, w)] * len(batch_secs))  # (B, 2) the resized frame
            boxes = torch.from_numpy(table.boxes[a:b])  # (N, 4)
            actor = actor_features(slow, fast, boxes, box_clip, image_hw, backbone_cfg.aligned)  # (N, C_s + C_f, R, R)
            actor_seq = actor_sequence(Ff, boxes, box_clip, image_hw, backbone_cfg.aligned)  # (N, C_f, T_f)
            if actor.shape[0] != b - a:
                raise AssertionError(f"{video_id}: {actor.shape[0]} actor features for {b - a} boxes")
            clock.lap("pool_roi")
            host = [x.to(to_host).cpu() for x in (slow, fast, fast_seq, actor, actor_seq)]
            clock.lap("to_host")
            if writer is None:
                # the group is created in the writer thread (its arrays: ~0.1 s of small files), while this one
                # goes on with the next batch; the appends queue behind it
                writer = pool.submit(
                    clock.timed(VideoWriter, "write"),
                    store,
                    video_id,
                    boxes=table,
                    image_hw=(h, w),
                    map_hw=tuple(slow.shape[-2:]),
                    channels=(slow.shape[1], fast.shape[1], fast_seq.shape[2]),
                    attributes={"backbone": backbone_cfg.to_dict()},
                    split=split,
                    claim=claim,
                )
                append = clock.timed(lambda *maps: writer.result().append(*maps), "write")
            if pending is not None:
                pending.result()  # one batch in flight at most; re-raises the writer's error
            clock.lap("write_wait")
            pending = pool.submit(append, *host)
            done += len(batch_secs)
        if pending is not None:
            pending.result()
    if writer is None or done != len(secs):
        raise ValueError(f"extract_video({video_id!r}): the loader gave {done} of {len(secs)} keyframes")
    marker = writer.result().finish()
    clock.lap("write_wait")
    return dict(video_id=video_id, keyframes=marker["keyframes"], boxes=marker["boxes"], skipped=False)


def commit_split(url: str | Path, spec: CacheSpec, split: str, video_ids: list[str]) -> dict:
    """Write the split's manifest once every video is complete."""
    with store_errors(url):
        return _commit_split(url, spec, split, video_ids)


def _commit_split(url: str | Path, spec: CacheSpec, split: str, video_ids: list[str]) -> dict:
    store = FeatureStore.open(url, expect=spec, mode="r+")
    missing = [v for v in video_ids if not store.is_complete(v)]
    if missing:
        raise RuntimeError(f"{url}: cannot commit split {split!r}: videos not complete: {missing[:5]}")
    other = {v: s for v in video_ids if (s := (store.video_attrs(v) or {}).get(SPLIT_ATTR)) not in (None, split)}
    if other:
        listed = ", ".join(f"{v} ({s})" for v, s in sorted(other.items())[:5])
        raise VideoOriginError(f"{url}: cannot commit split {split!r}: {len(other)} videos were extracted for another "
                               f"split: {listed}")
    return store.commit_split(split, video_ids)
