"""Extraction: its optional stage timings (every stage reported, the features written the same), the uint8 batches of a
video with each frame decoded once (the features of the float clips), the checkpoint read once per process."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.features.clips as clips_module
from cache import CacheSpec, FeatureStore, StorageConfig
from pipeline.ava import files as ava
from pipeline.ava import splits
from pipeline.ava.proposals import groundtruth_proposals
from pipeline.errors import InputError
from pipeline.features import checkpoints, extract
from pipeline.features.backbone import PRESETS, build_backbone
from pipeline.features.checkpoints import save_checkpoint
from pipeline.features.clips import KeyframeClips, VideoClipBatches, clip_loader
from pipeline.features.extract import extract_video

STAGES = {"first_batch", "load", "to_device", "backbone", "pool_roi", "to_host", "write_wait"}


def test_extract_video_timings_cover_the_call_and_change_nothing(tmp_path):
    cfg = PRESETS["mini"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    gt = pd.DataFrame(dict(video_id=["v"] * 3, timestamp=[902, 903, 904], x1=[0.1, 0.2, 0.5], y1=[0.2, 0.0, 0.1],
                           x2=[0.6, 0.7, 1.0], y2=[0.9, 0.8, 0.7], action_id=[3, 12, 80], person_id=[0, 0, 1]))
    h, w = 64, 96
    g = torch.Generator().manual_seed(1)
    clips = [(torch.randn(b, 3, cfg.t_slow, h, w, generator=g), torch.randn(b, 3, cfg.t_fast, h, w, generator=g)) for b in (2, 1)]
    loader = [dict(slow=s, fast=f, video_id=["v"] * len(s), sec=secs, height=h, width=w)
              for (s, f), secs in zip(clips, ([902, 903], [904]))]
    stores, timings = [], {}
    for name, into in (("plain", None), ("timed", timings)):
        spec = CacheSpec("ab" * 32, {"backbone": "mini", "run": name}, aligned=cfg.aligned,
                         storage=StorageConfig("float32", "none", 0))
        stores.append(FeatureStore.create(tmp_path / spec.name, spec))
        start = time.perf_counter()
        extract_video(backbone, cfg, loader, groundtruth_proposals(gt), stores[-1], "v", secs=[902, 903, 904],
                      timings=into)
        wall = time.perf_counter() - start
    assert set(timings) == STAGES | {"write"} and all(v >= 0 for v in timings.values())
    assert sum(timings[k] for k in STAGES) <= wall
    plain, timed = (s.video("v") for s in stores)
    for name in ("slow", "fast", "fast_seq", "actor", "actor_seq"):
        np.testing.assert_array_equal(plain[name][...], timed[name][...], err_msg=name)


def test_extract_split_video_leaves_torch_global_state_alone(tiny_ava, tiny_backbone, tmp_path):
    """One CPU thread and the backbone's random initialisation hold for the call only."""
    extraction = extract.ExtractionConfig(dtype="float32")
    spec = extract.cache_spec(tiny_backbone, extraction)
    video = splits.split_videos(tiny_ava, "val")[0]
    torch.set_num_threads(2)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    out = extract.extract_split_video(tiny_ava, "val", video, tiny_backbone, extract.store_url(tmp_path, spec), spec,
                                      extraction, device="cpu", cpu_threads=1)
    assert not out.get("skipped") and FeatureStore.open(extract.store_url(tmp_path, spec)).is_complete(video)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), rng)


def _float32_store(tmp_path, cfg, name: str) -> FeatureStore:
    spec = CacheSpec("ab" * 32, {"backbone": cfg.name, "run": name}, aligned=cfg.aligned,
                     storage=StorageConfig("float32", "none", 0))
    return FeatureStore.create(tmp_path / spec.name, spec)


def test_video_batches_write_the_features_of_the_float_clips_decoding_each_frame_once(tiny_ava, tiny_backbone,
                                                                                     tmp_path, monkeypatch):
    model, _ = extract.loaded_backbone(tiny_backbone)
    proposals, keyframes = splits.split_annotations(tiny_ava, "val")
    video = keyframes[0][0]
    secs = list(range(902, 908))  # every second (AVA's spacing): the windows overlap, unlike mini-AVA's keyframes
    clips = KeyframeClips.from_config(ava.AvaPaths(tiny_ava).frames, [(video, s) for s in secs], model.cfg)
    decoded = []
    real = clips_module.decode_frames
    stored = {}
    for name in ("float", "uint8"):
        if name == "float":
            loader = clip_loader(clips, batch_size=4)  # every keyframe's frames decoded, normalised on the CPU
        else:
            loader = VideoClipBatches(clips, batch_size=4, num_workers=0, run_frames=7)
            monkeypatch.setattr(clips_module, "decode_frames", lambda paths: decoded.extend(paths) or real(paths))
        store = _float32_store(tmp_path, model.cfg, name)
        out = extract_video(model, model.cfg, loader, proposals, store, video, secs=secs)
        assert out["keyframes"] == len(secs) and out["boxes"] > 0
        stored[name] = store.video(video)
    frames = clips.video_frames(video)
    distinct = sorted({int(i) for k in range(len(secs)) for i in clips.fast_frame_indices(k)})
    assert decoded == [frames[i] for i in distinct] and len(distinct) < len(secs) * model.cfg.t_fast * 0.6
    for name in ("slow", "fast", "fast_seq", "actor", "actor_seq", "sec"):
        np.testing.assert_array_equal(stored["float"][name][...], stored["uint8"][name][...], err_msg=name)


def test_the_checkpoint_is_read_and_hashed_once_per_process(tiny_ava, tiny_backbone, tmp_path, monkeypatch):
    ckpt = shutil.copy(tiny_backbone, tmp_path / "mini.pt")  # a file that no earlier test loaded
    reads, hashes = [], []
    real_read, real_hash = checkpoints._read, checkpoints.file_sha256
    monkeypatch.setattr(checkpoints, "_read", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(checkpoints, "file_sha256", lambda p: hashes.append(p) or real_hash(p))
    extraction = extract.ExtractionConfig(dtype="float32")
    spec = extract.cache_spec(ckpt, extraction)
    url = extract.store_url(tmp_path, spec)
    videos = splits.split_videos(tiny_ava, "train")
    assert len(videos) == 2
    for video in videos:
        extract.extract_split_video(tiny_ava, "train", video, ckpt, url, spec, extraction, device="cpu", num_workers=0)
    assert len(reads) == len(hashes) == 1
    # a new version of the file (ours are written and renamed: a new inode) is read again, and refused for a store
    # named after the old one before the store is touched
    torch.manual_seed(1)
    save_checkpoint(build_backbone(PRESETS["mini"]), PRESETS["mini"], ckpt)
    other = tmp_path / "other.zarr"
    with pytest.raises(InputError, match="mini.pt: sha256 .* the file changed since"):
        extract.extract_split_video(tiny_ava, "train", videos[0], ckpt, other, spec, extraction, device="cpu",
                                    num_workers=0)
    assert len(reads) == 2 and not other.exists()
