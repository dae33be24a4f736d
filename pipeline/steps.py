"""The pipeline's steps as plain functions over a dataset folder: what each Luigi task's ``run`` calls.

A notebook runs the same steps without Luigi::

    ckpt = train_mini_backbone(data, "runs/backbone/mini.pt")
    spec = cache_spec(ckpt, ExtractionConfig())
    for split in ("train", "val"):
        for video in split_videos(data, split):
            extract_split_video(data, split, video, ckpt, store_url(root, spec), spec)
        commit_split(store_url(root, spec), spec, split, split_videos(data, split))
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.schema import StorageConfig
from cache.store import CacheSpec, FeatureStore
from pipeline import ava
from pipeline.backbone import BackboneConfig, backbone_from_checkpoint, file_sha256


@dataclass(frozen=True)
class ExtractionConfig:
    """What, besides the backbone's weights, decides a cache's content (it goes into the store's name).

    ``threshold``: detector score for training proposals (ground truth + detector boxes >= threshold); the
    validation split stores every detector box. ``batch_size``: clips per backbone call (not significant for the
    values, but the same for everybody to keep float rounding identical).
    """

    threshold: float = 0.8
    dtype: str = "float16"
    compressor: str = "zstd"
    level: int = 3
    batch_size: int = 8

    def storage(self) -> StorageConfig:
        return StorageConfig(dtype=self.dtype, compressor=self.compressor, level=self.level)


def annotations(data_root: str | Path, split: str) -> dict[str, Path | None]:
    """The evaluation inputs of a split: groundtruth, detections, exclusions (None if absent) and labelmap."""
    paths = ava.AvaPaths(data_root)
    excl = paths.exclusions(split)
    return {"groundtruth": paths.groundtruth(split), "detections": paths.detections(split),
            "exclusions": excl if excl.exists() else None, "labelmap": paths.labelmap}


def split_annotations(data_root: str | Path, split: str, threshold: float = 0.8,
                      ) -> tuple[ava.Proposals, list[tuple[str, int]]]:
    """(``split_proposals``, ``split_keyframes``) from one read of the split's ground truth and detections."""
    paths = ava.AvaPaths(data_root)
    gt, det = ava.read_groundtruth(paths.groundtruth(split)), ava.read_detections(paths.detections(split))
    return _proposals(split, gt, det, threshold), _keyframes(gt, det)


def split_proposals(data_root: str | Path, split: str, threshold: float = 0.8) -> ava.Proposals:
    """Training proposals for ``train`` (ground truth + detector boxes >= threshold), detector boxes for the rest."""
    return split_annotations(data_root, split, threshold)[0]


def split_keyframes(data_root: str | Path, split: str) -> list[tuple[str, int]]:
    """Every annotated keyframe of a split (ground truth or detections), sorted."""
    return split_annotations(data_root, split)[1]


def _proposals(split: str, gt, det, threshold: float) -> ava.Proposals:
    return ava.training_proposals(gt, det, threshold) if split == "train" else ava.eval_proposals(det)


def _keyframes(gt, det) -> list[tuple[str, int]]:
    keys = set()
    for frame in (gt, det):
        keys |= set(zip(frame["video_id"].astype(str), frame["timestamp"].astype(int)))
    return sorted(keys)


def split_videos(data_root: str | Path, split: str) -> list[str]:
    return sorted({v for v, _ in split_keyframes(data_root, split)})


def cache_spec(checkpoint: str | Path, extraction: ExtractionConfig) -> CacheSpec:
    """The identity of the store that ``checkpoint`` and ``extraction`` produce."""
    model_cfg = _backbone_config(checkpoint)
    return CacheSpec(
        backbone_sha256=file_sha256(checkpoint),
        extraction={"backbone": model_cfg.name, "backbone_config": model_cfg.to_dict(),
                    **{k: v for k, v in dataclasses.asdict(extraction).items() if k not in ("dtype", "compressor", "level")}},
        aligned=model_cfg.aligned,
        storage=extraction.storage(),
    )


def _backbone_config(checkpoint: str | Path) -> BackboneConfig:
    """Our checkpoints carry their config; pytorchvideo's AVA/Kinetics files are the ``r50`` preset."""
    from pipeline.backbone import PRESETS

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return BackboneConfig.from_dict(ckpt["config"]) if "config" in ckpt else PRESETS["r50"]


def store_url(root: str | Path, spec: CacheSpec) -> Path:
    return Path(root) / "cache" / f"{spec.name}.zarr"


def extract_split_video(data_root: str | Path, split: str, video_id: str, checkpoint: str | Path, url: str | Path,
                        spec: CacheSpec, extraction: ExtractionConfig = ExtractionConfig(),
                        device: str | None = None, num_workers: int = 0, index: str | Path | None = None,
                        cpu_threads: int | None = 1) -> dict:
    """Extract one video of a split into the store at ``url`` (created with ``spec`` if absent).

    ``index``: the split's index folder (``write_split_index``); without it the annotation files and the frame list
    are read here, which on AVA costs seconds per video. ``cpu_threads``: torch threads on a CPU device; one per
    task lets Luigi's parallel workers share the cores (two workers with two threads each ran the mini-AVA train
    split 3x slower than one worker), None keeps torch's default.
    """
    from pipeline.clips import KeyframeClips, clip_loader
    from pipeline.extract import extract_video

    paths = ava.AvaPaths(data_root)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    store = FeatureStore.create(url, spec)
    if store.is_complete(video_id):
        return {"video_id": video_id, "skipped": True}
    if index is None:
        proposals, keyframes = split_annotations(data_root, split, extraction.threshold)
        frame_lists = ava.frames_by_video(ava.read_frame_list(paths.frame_list(split)))
    else:
        proposals, keyframes, frame_lists = read_split_index(index)
    secs = [s for v, s in keyframes if v == video_id]
    if not secs:
        raise ValueError(f"{paths.root}: video {video_id!r} has no keyframe in the {split} annotations")
    model, _ = backbone_from_checkpoint(checkpoint)
    model = model.to(device).eval()
    clips = KeyframeClips.from_config(paths.frames, [(video_id, s) for s in secs], model.cfg, frame_lists)
    loader = clip_loader(clips, batch_size=extraction.batch_size, num_workers=num_workers)
    return extract_video(model, model.cfg, loader, proposals.for_video(video_id), store, video_id, secs=secs,
                         device=device)


# ----------------------------------------------------------------------------------------------- split index

_PROPOSAL_FIELDS = ("video_ids", "timestamps", "offsets", "boxes", "source", "score", "person_id", "labels")


class CanonicalFrames(Mapping):
    """video id -> frame paths for frame lists that follow ``<id>/<id>_%06d.jpg``, 1..count, from counts alone."""

    def __init__(self, counts: Mapping[str, int], irregular: Mapping[str, list[str]]):
        self.counts, self.irregular = dict(counts), dict(irregular)

    def __getitem__(self, video_id: str) -> list[str]:
        if video_id in self.irregular:
            return self.irregular[video_id]
        return [f"{video_id}/{video_id}_{i:06d}.jpg" for i in range(1, self.counts[video_id] + 1)]

    def __iter__(self):
        return iter([*self.counts, *self.irregular])

    def __len__(self) -> int:
        return len(self.counts) + len(self.irregular)


def write_split_index(data_root: str | Path, split: str, threshold: float, out: str | Path) -> Path:
    """Read a split's annotations and frame list once, for every extraction task of that split.

    ``out/`` gets ``proposals.npz`` (the proposals and every annotated keyframe) and ``frames.json`` (frame counts
    of videos whose frame list follows ``<id>/<id>_%06d.jpg``, explicit paths for the others); written into a
    temporary folder renamed into place.
    """
    out = Path(out)
    paths = ava.AvaPaths(data_root)
    proposals, keyframes = split_annotations(data_root, split, threshold)
    counts, irregular = {}, {}
    for video_id, frames in ava.frames_by_video(ava.read_frame_list(paths.frame_list(split))).items():
        canonical = [f"{video_id}/{video_id}_{i:06d}.jpg" for i in range(1, len(frames) + 1)]
        if frames == canonical:
            counts[video_id] = len(frames)
        else:
            irregular[video_id] = frames
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {f: getattr(proposals, f) for f in _PROPOSAL_FIELDS}
    arrays["video_ids"] = arrays["video_ids"].astype(str)
    np.savez(tmp / "proposals.npz", **arrays, kf_video=np.array([v for v, _ in keyframes], dtype=str),
             kf_sec=np.array([s for _, s in keyframes], dtype=np.int64))
    (tmp / "frames.json").write_text(json.dumps({"counts": counts, "irregular": irregular}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_split_index(index: str | Path) -> tuple[ava.Proposals, list[tuple[str, int]], Mapping[str, list[str]]]:
    """(proposals, annotated keyframes, video id -> frame paths) of a ``write_split_index`` folder."""
    index = Path(index)
    with np.load(index / "proposals.npz") as z:
        fields = {f: z[f] for f in _PROPOSAL_FIELDS}
        fields["video_ids"] = fields["video_ids"].astype(object)
        keyframes = list(zip(z["kf_video"].tolist(), z["kf_sec"].tolist()))
    frames = json.loads((index / "frames.json").read_text())
    return ava.Proposals(**fields), keyframes, CanonicalFrames(frames["counts"], frames["irregular"])


def commit_split(url: str | Path, spec: CacheSpec, split: str, video_ids: list[str]) -> dict:
    """Write the split's manifest once every video is complete."""
    store = FeatureStore.open(url, expect=spec, mode="r+")
    missing = [v for v in video_ids if not store.is_complete(v)]
    if missing:
        raise RuntimeError(f"{url}: cannot commit split {split!r}: videos not complete: {missing[:5]}")
    return store.commit_split(split, video_ids)


MINI_BACKBONE_EPOCHS = 4


def train_mini_backbone(data_root: str | Path, out_path: str | Path, epochs: int = MINI_BACKBONE_EPOCHS,
                        seed: int = 0, device: str | None = None) -> dict:
    """The minimal backbone step of the mini pipeline: the ``mini`` SlowFast from random weights, trained end to end
    with the baseline head on the mini-AVA training split (``pipeline.finetune``).

    4 epochs over the default mini-AVA's 1152 training keyframes (576 steps) take about 170 s on 2 cores, a
    third of the mini demo's budget. See README for how Table 1 on the mini-AVA moves with this number."""
    from pipeline.backbone import PRESETS
    from pipeline.finetune import FinetuneConfig, finetune_on_ava

    return finetune_on_ava(data_root, out_path, PRESETS["mini"], FinetuneConfig(epochs=epochs, seed=seed),
                           device=device, log=None)
